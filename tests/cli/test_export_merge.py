"""``rankwise export`` (adapter -> PEFT directory) and ``rankwise merge`` (adapter -> merged HF model):
outputs equal to the adapted model, the base model found from what the adapter records, and one-line
errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, BertTokenizer

import rankwise as rw
from rankwise.models import load_model, tiny_bert, tiny_llama
from tests.cli.cli_helpers import needs_assets, one_line, run_cli

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(59))]
#: kind -> (task the adapter is trained with, num_labels, class that loads the merged directory)
KINDS = {"bert": ("seq-cls", 5, AutoModelForSequenceClassification), "llama": ("causal-lm", None, AutoModelForCausalLM)}


def model_dir(root: Path, kind: str) -> Path:
    """A tiny random base model with a word-level tokenizer: a bare BERT (a classification head is added
    on load, as for MiniLM) or a Llama causal LM."""
    path = root / f"tiny-{kind}"
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    model = tiny_bert(vocab_size=len(WORDS), task="base", seed=0) if kind == "bert" else \
        tiny_llama(vocab_size=len(WORDS), seed=0)
    model.save_pretrained(str(path))
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(str(path))
    return path


def adapted(path: Path, kind: str, method: str, out: Path) -> torch.nn.Module:
    """``path`` loaded for its task, adapted with ``method``, every trained tensor moved off its init, and
    the adapter saved to ``out``."""
    task, num_labels, _ = KINDS[kind]
    torch.manual_seed(0)
    model, _ = load_model(str(path), task=task, num_labels=num_labels)
    rw.adapt(model, method, r=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    rw.save_adapter(model, out)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(5, len(WORDS), (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def fresh_base(path: Path, kind: str) -> torch.nn.Module:
    task, num_labels, _ = KINDS[kind]
    return load_model(str(path), task=task, num_labels=num_labels)[0]


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("kind,method", [("bert", "lora"), ("llama", "dora"), ("bert", "vera")])
def test_export_loads_in_peft_with_the_adapted_outputs(tmp_path, capsys, kind, method):
    from peft import PeftModel

    base_dir = model_dir(tmp_path, kind)
    model = adapted(base_dir, kind, method, tmp_path / "adapter")
    code, out, err = run_cli(capsys, "export", tmp_path / "adapter", "--output", tmp_path / "peft")
    assert code == 0, err
    assert "PeftModel.from_pretrained" in out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "dora")
    loaded = PeftModel.from_pretrained(fresh_base(base_dir, kind), str(tmp_path / "peft"))
    expected = logits(model)
    assert (expected - logits(fresh_base(base_dir, kind))).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)


def test_export_of_a_full_rank_method_says_to_merge(tmp_path, capsys):
    base_dir = model_dir(tmp_path, "llama")
    adapted(base_dir, "llama", "randlora", tmp_path / "adapter")
    code, _, err = run_cli(capsys, "export", tmp_path / "adapter", "--output", tmp_path / "peft")
    assert one_line(code, err, "method 'randlora' cannot be exported") and "rankwise merge" in err
    assert not (tmp_path / "peft").exists()


def test_export_of_an_input_dependent_method_does_not_point_to_merge(tmp_path, capsys):
    """DenseLoRA applies GELU inside its update: neither a LoRA pair nor a mergeable ΔW (it said to merge)."""
    base_dir = model_dir(tmp_path, "llama")
    adapted(base_dir, "llama", "denselora", tmp_path / "adapter")
    code, _, err = run_cli(capsys, "export", tmp_path / "adapter", "--output", tmp_path / "peft")
    assert one_line(code, err, "method 'denselora' cannot be exported", "cannot be merged either", "rw.load_adapter")
    assert "rankwise merge" not in err


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize("kind,method", [("bert", "lora"), ("llama", "dora"), ("llama", "randlora"), ("bert", "bone")])
def test_merge_loads_with_from_pretrained_and_the_adapted_outputs(tmp_path, capsys, kind, method):
    base_dir = model_dir(tmp_path, kind)
    model = adapted(base_dir, kind, method, tmp_path / "adapter")
    code, out, err = run_cli(capsys, "merge", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert code == 0, err
    auto = KINDS[kind][2]
    assert f"{auto.__name__}.from_pretrained" in out
    merged = auto.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    assert not any(type(m).__module__.startswith("rankwise") for m in merged.modules())
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=0)
    assert BertTokenizer.from_pretrained(str(tmp_path / "merged")).vocab_size == len(WORDS)


def test_merge_of_a_bare_model_adapter(tmp_path, capsys):
    """No head and no LM head: the adapter goes onto the bare model (AutoModel)."""
    base_dir = model_dir(tmp_path, "bert")
    model, _ = load_model(str(base_dir), task="base")
    rw.adapt(model, "lora", r=2, targets=["query", "value"])
    torch.nn.init.normal_(model.encoder.layer[0].attention.self.query.lora_B, std=0.1)
    rw.save_adapter(model, tmp_path / "adapter")
    code, out, err = run_cli(capsys, "merge", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert code == 0, err and "(base)" in out
    merged = AutoModel.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    ids = torch.randint(5, len(WORDS), (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                   atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the base model
def test_an_adapter_without_model_info_needs_model(tmp_path, capsys):
    base_dir = model_dir(tmp_path, "llama")
    model = tiny_llama(vocab_size=len(WORDS), seed=0)  # built from a config: it records no name or path
    rw.adapt(model, "lora", r=2)
    rw.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "rankwise_adapter.json").read_text())["base_model"] is None
    for command in ("export", "merge"):
        code, _, err = run_cli(capsys, command, tmp_path / "adapter", "--output", tmp_path / command)
        assert one_line(code, err, "does not record its base model") and "--model" in err
    code, _, err = run_cli(capsys, "export", tmp_path / "adapter", "--model", base_dir, "--output", tmp_path / "p")
    assert code == 0, err


def test_a_recorded_base_model_that_is_gone_names_it(tmp_path, capsys):
    base_dir = model_dir(tmp_path, "llama")
    adapted(base_dir, "llama", "lora", tmp_path / "adapter")
    moved = base_dir.rename(tmp_path / "elsewhere")
    code, _, err = run_cli(capsys, "merge", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert one_line(code, err, str(base_dir)) and "--model" in err
    code, _, err = run_cli(capsys, "merge", tmp_path / "adapter", "--model", moved, "--output", tmp_path / "merged")
    assert code == 0, err


def test_a_randomly_initialized_base_is_refused(tmp_path, capsys):
    base_dir = model_dir(tmp_path, "llama")
    adapted(base_dir, "llama", "lora", tmp_path / "adapter")
    code, _, err = run_cli(capsys, "merge", tmp_path / "adapter", "--model", "scratch-20m", "--output", tmp_path / "m")
    assert one_line(code, err, "randomly initialized")


def test_an_adapter_that_does_not_fit_the_model(tmp_path, capsys):
    adapted(model_dir(tmp_path, "llama"), "llama", "lora", tmp_path / "adapter")
    bert = model_dir(tmp_path, "bert")
    code, _, err = run_cli(capsys, "export", tmp_path / "adapter", "--model", bert, "--output", tmp_path / "p")
    assert one_line(code, err, "does not fit base model")


# ----------------------------------------------------------------------------- paths
def test_missing_or_wrong_adapter_directory(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", tmp_path / "nope", "--output", tmp_path / "p")
    assert one_line(code, err, "adapter directory") and "not found" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "merge", tmp_path / "empty", "--output", tmp_path / "m")
    assert one_line(code, err, "is not a rankwise adapter directory")
    code, _, err = run_cli(capsys, "export", tmp_path / "empty")
    assert one_line(code, err, "--output")  # argparse: a required flag is missing


def test_output_is_checked_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    base_dir = model_dir(tmp_path, "llama")
    adapted(base_dir, "llama", "lora", tmp_path / "adapter")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("rankwise.models.load_model", no_load)
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    capsys.readouterr()  # what building the model printed
    for output, needle in [(tmp_path / "file" / "out", "is not a directory"),
                           (tmp_path / "file", "is not a directory"),
                           (tmp_path / "full", "pass --overwrite"),
                           (tmp_path, "holds the input")]:
        for command in ("export", "merge"):
            code, _, err = run_cli(capsys, command, tmp_path / "adapter", "--output", output)
            assert one_line(code, err, needle), (command, output, err)
    code, _, err = run_cli(capsys, "export", tmp_path / "adapter", "--output", tmp_path, "--overwrite")
    assert one_line(code, err, "holds the input")
    assert (tmp_path / "full" / "keep.txt").exists()


def test_overwrite_replaces_a_non_empty_output(tmp_path, capsys):
    base_dir = model_dir(tmp_path, "llama")
    adapted(base_dir, "llama", "lora", tmp_path / "adapter")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "old.txt").write_text("x")
    code, _, err = run_cli(capsys, "export", tmp_path / "adapter", "--output", tmp_path / "peft", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (tmp_path / "empty").mkdir()  # an existing empty directory needs no --overwrite
    code, _, err = run_cli(capsys, "merge", tmp_path / "adapter", "--output", tmp_path / "empty")
    assert code == 0, err


# ----------------------------------------------------------------------------- a rankwise train run
@needs_assets
def test_train_run_exports_and_merges_from_its_metrics(tmp_path, capsys):
    """A `rankwise train` output directory: the base model and the head size come from the run itself
    (metrics.json and the trained head), even when rankwise_adapter.json does not name the model."""
    from peft import PeftModel

    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--method", "lora", "--rank", "4", "--targets", "query,value",
                           "--output", run, "--max-steps", "2", "--batch-size", "4", "--max-length", "24",
                           "--train-limit", "16", "--test-limit", "8", "--no-progress")
    assert code == 0, err
    config_file = run / "adapter" / "rankwise_adapter.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model": None}))
    base, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
    model = rw.load_adapter(base, run / "adapter")
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    code, _, err = run_cli(capsys, "export", run, "--output", tmp_path / "peft")
    assert code == 0, err
    fresh, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "peft"))
    code, _, err = run_cli(capsys, "merge", run, "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
