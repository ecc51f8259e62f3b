"""Held-out perplexity and the small data helpers that compression loops share.

Perplexity of a causal LM on fixed blocks: ``exp(Σ NLL / Σ predicted tokens)``; every block has the
same length, so each contributes ``block_size − 1`` predicted tokens. The evaluation corpora are the
test splits of BBC News (prose) and the pinned Python stdlib files (code), cut into blocks with
:func:`rankwise.data.lm_blocks`; the first ``n_blocks`` blocks are used, so the set is fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.gradients import default_loss

EVAL_CORPORA = ("bbc", "stdlib-code")
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def move_batch(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def batch_stream(data: Iterable, steps: int) -> Iterator[Any]:
    """Yield ``steps`` batches from ``data``, starting over when it runs out (ValueError if empty)."""
    if steps < 0:
        raise ValueError(f"steps={steps!r} must be >= 0")
    produced = 0
    while produced < steps:
        empty = True
        for batch in data:
            empty = False
            yield batch
            produced += 1
            if produced >= steps:
                return
        if empty:
            raise ValueError("data yielded no batch")


def loss_of(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> torch.Tensor:
    """``loss_fn(model, batch)``, default ``model(**batch).loss``."""
    return (loss_fn or default_loss)(model, batch)


def train_steps(
    model: nn.Module,
    params: list[torch.Tensor],
    data: Iterable,
    steps: int,
    lr: float,
    loss_fn: LossFn | None = None,
    progress: bool = False,
    desc: str = "train",
    after_backward: Callable[[int], dict] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[dict]:
    """``steps`` AdamW steps (no weight decay) on ``params`` over ``data`` (restarted when it runs
    out), the model in train mode and back in eval mode after. ``after_backward(step)`` runs between
    backward and the optimizer step and returns extra history fields; ``after_step(step)`` runs after
    it. Returns ``[{"step", "loss", **extra}]``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    history = []
    model.train()
    try:
        stream = batch_stream(data, steps)
        for step, batch in enumerate(tqdm(stream, total=steps, desc=desc, disable=not progress, leave=False)):
            loss = loss_of(model, move_batch(batch, device), loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            extra = after_backward(step) if after_backward is not None else {}
            opt.step()
            history.append({"step": step, "loss": loss.item(), **extra})
            if after_step is not None:
                after_step(step)
    finally:
        model.eval()
    return history


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """``exp`` of the mean next-token NLL of a causal LM over ``blocks`` [n, T] (labels = inputs)."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be a non-empty [n_blocks, block_size >= 2] tensor, got {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress, leave=False):
            ids = blocks[i : i + batch_size].to(device)
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    return math.exp(total / count)


def eval_blocks(tokenizer: Any, corpus: str, n_blocks: int = 16, block_size: int = 128, seed: int = 0) -> torch.Tensor:
    """The first ``n_blocks`` blocks of ``corpus``'s test split (``bbc`` or ``stdlib-code``)."""
    from ..data import lm_blocks, load_text

    if corpus not in EVAL_CORPORA:
        raise ValueError(f"corpus={corpus!r} is not allowed; choose one of {list(EVAL_CORPORA)}")
    if n_blocks < 1:
        raise ValueError(f"n_blocks={n_blocks!r} must be >= 1")
    docs = load_text(corpus, split="test", seed=seed)
    blocks = torch.empty(0, block_size, dtype=torch.long)
    take = 1
    while len(blocks) < n_blocks and take <= len(docs):
        take = min(len(docs), max(take * 2, 4))
        blocks = lm_blocks(docs[:take], tokenizer, block_size)
        if take == len(docs):
            break
    if len(blocks) == 0:
        raise ValueError(f"corpus {corpus!r} has fewer than {block_size} test tokens")
    return blocks[:n_blocks]


def evaluate_corpora(
    model: nn.Module,
    tokenizer: Any,
    n_blocks: int = 16,
    block_size: int = 128,
    batch_size: int = 8,
    corpora: Iterable[str] = EVAL_CORPORA,
    blocks: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Held-out perplexity per corpus; pass ``blocks`` (from :func:`eval_blocks`) to reuse them."""
    result = {}
    for corpus in corpora:
        data = blocks[corpus] if blocks and corpus in blocks else eval_blocks(tokenizer, corpus, n_blocks, block_size)
        result[corpus] = perplexity(model, data, batch_size, progress)
    return result


def weight_count(model: nn.Module) -> int:
    """All (unique) parameters of ``model``."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
