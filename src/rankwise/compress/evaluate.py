"""Held-out perplexity of compressed causal LMs on fixed blocks of the evaluation corpora.

Perplexity on fixed blocks: ``exp(Σ NLL / Σ predicted tokens)`` (:func:`rankwise.train.evaluate`,
the one perplexity of rankwise); every block has the same length, so each contributes
``block_size − 1`` predicted tokens. The evaluation corpora are the test splits of BBC News (prose)
and the pinned Python stdlib files (code), cut into blocks with :func:`rankwise.data.lm_blocks`; the
first ``n_blocks`` blocks are used, so the set is fixed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..memory import total_params
from ..train import evaluate

EVAL_CORPORA = ("bbc", "stdlib-code")

#: All unique parameters of a model (the count ``rankwise compress`` reports).
weight_count = total_params


def block_batches(blocks: torch.Tensor, batch_size: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """LM batches of ``batch_size`` blocks [n, T]: ``{"input_ids": ids, "labels": ids}``."""
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size]
        yield {"input_ids": ids, "labels": ids}


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """``exp`` of the mean next-token NLL of a causal LM over ``blocks`` [n, T] (labels = inputs)."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be a non-empty [n_blocks, block_size >= 2] tensor, got {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    batches = block_batches(blocks, batch_size)
    total = -(-len(blocks) // batch_size)
    return evaluate(model, tqdm(batches, total=total, desc="perplexity", disable=not progress, leave=False),
                    task="lm")["perplexity"]


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
