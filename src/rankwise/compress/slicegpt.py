"""SliceGPT — Ashkboos et al. 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and
Columns" (ICLR 2024, arXiv 2401.15024; official code microsoft/TransformerCompression).

Computational invariance: once every RMSNorm scale is folded into the linears that read its output,
the norm is ``x ↦ x/‖x‖·√d`` and commutes with any orthogonal Q, so the residual stream can be
expressed in a new basis per block without changing the function: the embedding becomes ``E Q₀``,
a block's readers (q/k/v, gate/up, the head) ``W Q`` and its writers (o, down) ``Qᵀ W``. With a
different Q before each attention and each MLP the residual shortcut carries ``Q_lᵀ Q_{l+1}``.
Each Q is the PCA basis (eigenvectors of ``Σ x xᵀ`` over the calibration tokens, descending) of the
signal entering that attention / MLP, computed sequentially on the already-sliced model. Slicing
keeps the first ``d' = ratio·d`` principal directions: embedding columns, q/k/v/gate/up input
columns, o/down output rows and the shortcut matrices become ``d'``-sized, so the model is
physically smaller. The last block writes the full ``d`` and the head is rotated but not sliced
(the official default). The sliced norms keep dividing ``Σx²`` by the original ``d`` (official ``RMSN``).

The result replaces every decoder layer by :class:`SlicedDecoderLayer` (the original attention and
MLP modules, scale-free norms, two shortcut linears) and unties a tied head; :func:`apply_sliced_layout`
rebuilds that structure on a freshly built model before a strict state-dict load.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from .. import checks
from .layer_inputs import first_layer_inputs
from .resize import set_weight

BASES = ("pca", "random")


@dataclass
class SliceGPTConfig:
    """``round_to``: the sliced width is ``⌊ratio·d⌋`` rounded down to a multiple of this (official
    ``--round-interval``, 8); ``basis``: ``"pca"`` (the method) or ``"random"`` (random orthogonal
    bases: the control that shows what PCA buys); ``seed``: of the random bases."""

    round_to: int = 8
    basis: str = "pca"
    seed: int = 0

    def __post_init__(self) -> None:
        checks.integer("round_to", self.round_to, 1)
        checks.choice("basis", self.basis, BASES)
        checks.integer("seed", self.seed)


class SlicedRMSNorm(nn.Module):
    """``x·(Σᵢxᵢ²/mean_dim + eps)^{-1/2}``: an RMSNorm whose scale was folded into the next linears;
    ``mean_dim`` stays the original width when ``x`` is sliced (half precision is computed in float32)."""

    def __init__(self, mean_dim: int, eps: float) -> None:
        super().__init__()
        self.mean_dim = mean_dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (z * torch.rsqrt(z.pow(2).sum(-1, keepdim=True) / self.mean_dim + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


class SlicedDecoderLayer(GradientCheckpointingLayer):
    """A pre-norm decoder layer with rotated shortcuts:
    ``h = S_a x + Attn(N(x))``, ``y = S_m h + MLP(N(h))`` (S_a, S_m: ``attn_shortcut``, ``mlp_shortcut``)."""

    def __init__(self, layer: nn.Module, eps: float, mean_dim: int, dims: tuple[int, int, int]) -> None:
        super().__init__()
        d_in, d_mid, d_out = dims
        self.input_layernorm = SlicedRMSNorm(mean_dim, eps)
        self.self_attn = layer.self_attn
        self.post_attention_layernorm = SlicedRMSNorm(mean_dim, eps)
        self.mlp = layer.mlp
        weight = layer.self_attn.q_proj.weight
        kw = {"bias": False, "device": weight.device, "dtype": weight.dtype}
        self.attn_shortcut = nn.Linear(d_in, d_mid, **kw)
        self.mlp_shortcut = nn.Linear(d_mid, d_out, **kw)

    def attention(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)[0]

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(h))

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        h = self.attn_shortcut(hidden_states) + self.attention(hidden_states, **kwargs)
        return self.mlp_shortcut(h) + self.feed_forward(h)


# ------------------------------------------------------------------------------------------- structure
def _decoder(model: nn.Module) -> nn.Module:
    """The Llama-style decoder (``model.model``: ``embed_tokens``, ``layers``, ``norm``) with a head."""
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    layers = getattr(inner, "layers", None)
    if not (isinstance(head, nn.Linear) and isinstance(getattr(inner, "embed_tokens", None), nn.Embedding)
            and isinstance(layers, nn.ModuleList) and len(layers) and hasattr(inner, "norm")):
        raise ValueError("slicegpt needs a Llama-style causal LM (model.model.embed_tokens / layers / norm and "
                         "model.lm_head)")
    for i, layer in enumerate(layers):
        for part in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            try:
                layer.get_submodule(part)
            except AttributeError:
                raise ValueError(f"slicegpt: model.model.layers.{i} has no '{part}' (Llama-style pre-norm block "
                                 "needed)") from None
    return inner


def _readers(layer: nn.Module, part: str) -> list[nn.Linear]:
    return ([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj] if part == "attn"
            else [layer.mlp.gate_proj, layer.mlp.up_proj])


def _norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float):
        raise ValueError(f"slicegpt: cannot read the epsilon of {type(norm).__name__} (RMSNorm expected)")
    if getattr(norm, "bias", None) is not None:
        raise ValueError("slicegpt supports RMSNorm blocks only (found a norm with a bias)")
    return eps


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Fold every RMSNorm scale into the linears that read its output (``W ← W diag(γ)``), unties a
    tied head first, and set the scales to 1: the function is unchanged."""
    inner = _decoder(model)
    if model.lm_head.weight is inner.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    pairs = [(layer.input_layernorm, _readers(layer, "attn")) for layer in inner.layers]
    pairs += [(layer.post_attention_layernorm, _readers(layer, "mlp")) for layer in inner.layers]
    pairs.append((inner.norm, [model.lm_head]))
    for norm, linears in pairs:
        _norm_eps(norm)
        for lin in linears:
            lin.weight.copy_((lin.weight.double() * norm.weight.double()).to(lin.weight.dtype))
        norm.weight.fill_(1.0)


def _basis(signals: list[torch.Tensor], masks: list[torch.Tensor], basis: str, gen: torch.Generator) -> torch.Tensor:
    """Orthogonal d×d basis (float64): PCA — eigenvectors of ``Σ x xᵀ`` over the unmasked tokens, by
    descending eigenvalue — or a random orthogonal matrix."""
    d = signals[0].shape[-1]
    if basis == "random":
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).to(signals[0].device)
    gram = torch.zeros(d, d, dtype=torch.float64, device=signals[0].device)
    for x, m in zip(signals, masks, strict=True):
        z = x[m].double()
        gram.addmm_(z.T, z)
    values, vectors = torch.linalg.eigh(gram)
    return vectors[:, values.argsort(descending=True)]


def _read_in(linears: list[nn.Linear], q: torch.Tensor, k: int) -> None:
    """Readers of the residual stream: ``W ← (W Q)[:, :k]``."""
    for lin in linears:
        set_weight(lin, (lin.weight.double() @ q)[:, :k])


def _write_out(lin: nn.Linear, q: torch.Tensor, k: int) -> None:
    """Writers of the residual stream: ``W ← (Qᵀ W)[:k]``, ``b ← (Qᵀ b)[:k]``."""
    bias = None if lin.bias is None else (q.T @ lin.bias.double())[:k]
    set_weight(lin, (q.T @ lin.weight.double())[:k], bias)


def _shortcut(lin: nn.Linear, q_from: torch.Tensor, k_from: int, q_to: torch.Tensor, k_to: int) -> None:
    """The shortcut between two bases: ``y = x Q_fromᵀ[:k_from] Q_to[:, :k_to]`` (paper Sec. 3.3)."""
    set_weight(lin, (q_to[:, :k_to].T @ q_from[:, :k_from]))


def sliced_width(d: int, ratio: float, round_to: int) -> int:
    """``⌊ratio·d⌋`` rounded down to a multiple of ``round_to`` (at least ``round_to``, at most ``d``)."""
    return min(d, max(round_to, int(ratio * d) // round_to * round_to))


@torch.no_grad()
def slicegpt(model: nn.Module, data: Iterable, ratio: float, progress: bool = False,
             **config: Any) -> dict[str, Any]:
    """Rotate ``model`` into per-block PCA bases of ``data`` and slice its hidden width to
    :func:`sliced_width`; returns the layout that :func:`apply_sliced_layout` rebuilds."""
    cfg = SliceGPTConfig(**config)
    inner = _decoder(model)
    was_training = model.training
    model.eval()
    d = inner.embed_tokens.embedding_dim
    k = sliced_width(d, ratio, cfg.round_to)
    eps = _norm_eps(inner.layers[0].input_layernorm)
    gen = torch.Generator().manual_seed(cfg.seed)
    captured = first_layer_inputs(model, inner.layers[0], data, "slicegpt")
    fold_norms(model)
    signals = [h for h, _, _ in captured]
    masks = [m for _, _, m in captured]
    q = _basis(signals, masks, cfg.basis, gen)
    emb = inner.embed_tokens
    emb.weight = nn.Parameter((emb.weight.double() @ q)[:, :k].to(emb.weight.dtype),
                              requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = k
    dims = []
    last = len(inner.layers) - 1
    for i, layer in enumerate(tqdm(list(inner.layers), desc="slicegpt", disable=not progress, leave=False)):
        k_out = d if i == last else k
        new = SlicedDecoderLayer(layer, eps, d, (k, k, k_out))
        _read_in(_readers(layer, "attn"), q, k)
        xs = [(x.double() @ q[:, :k]).to(x.dtype) for x in signals]
        mids = [(x.double() @ q[:, :k].T).to(x.dtype) + new.attention(x, **kw)
                for x, (_, kw, _) in zip(xs, captured, strict=True)]
        q_mid = _basis(mids, masks, cfg.basis, gen)
        _shortcut(new.attn_shortcut, q, k, q_mid, k)
        _write_out(layer.self_attn.o_proj, q_mid, k)
        _read_in(_readers(layer, "mlp"), q_mid, k)
        hs = [(m.double() @ q_mid[:, :k]).to(m.dtype) for m in mids]
        signals = [(h.double() @ q_mid[:, :k].T).to(h.dtype) + new.feed_forward(h) for h in hs]
        q_out = _basis(signals, masks, cfg.basis, gen)
        _shortcut(new.mlp_shortcut, q_mid, k, q_out, k_out)
        _write_out(layer.mlp.down_proj, q_out, k_out)
        inner.layers[i] = new
        dims.append([k, k, k_out])
        q = q_out
    _read_in([model.lm_head], q, d)
    inner.norm = SlicedRMSNorm(d, _norm_eps(inner.norm))
    model.train(was_training)
    return {"hidden_size": d, "width": k, "eps": eps, "final_eps": inner.norm.eps, "dims": dims}


# ------------------------------------------------------------------------------------------- rebuild
def apply_sliced_layout(model: nn.Module, layout: dict[str, Any], where: str = "layout") -> None:
    """Give a freshly built model the structure :func:`slicegpt` left (untied head, sliced embedding,
    :class:`SlicedDecoderLayer` of the recorded widths, scale-free final norm), ready for a strict load."""
    inner = _decoder(model)
    if not isinstance(layout, dict) or set(layout) != {"hidden_size", "width", "eps", "final_eps", "dims"}:
        raise ValueError(f"{where}: the sliced layout must give hidden_size, width, eps, final_eps and dims")
    d = inner.embed_tokens.embedding_dim
    if layout["hidden_size"] != d:
        raise ValueError(f"{where}: hidden_size={layout['hidden_size']!r} does not match the model's {d}")
    dims = layout["dims"]
    if not isinstance(dims, list) or len(dims) != len(inner.layers):
        raise ValueError(f"{where}: dims must list [in, mid, out] for each of the {len(inner.layers)} layers")
    checks.integer(f"{where}: width", layout["width"], 1, d)
    for i, row in enumerate(dims):
        if not (isinstance(row, list) and len(row) == 3):
            raise ValueError(f"{where}: dims[{i}]={row!r} must be [in, mid, out]")
        for v in row:
            checks.integer(f"{where}: dims[{i}]", v, 1, d)
    for name in ("eps", "final_eps"):
        checks.number(f"{where}: {name}", layout[name], 0)
    model.config.tie_word_embeddings = False
    head = model.lm_head
    model.lm_head = nn.Linear(dims[-1][2], head.out_features, bias=head.bias is not None,
                              device=head.weight.device, dtype=head.weight.dtype)
    emb = inner.embed_tokens
    inner.embed_tokens = nn.Embedding(emb.num_embeddings, layout["width"], padding_idx=emb.padding_idx,
                                      device=emb.weight.device, dtype=emb.weight.dtype)
    for i, layer in enumerate(list(inner.layers)):
        d_in, d_mid, d_out = dims[i]
        attn, mlp = layer.self_attn, layer.mlp
        for lin, n_in in ((attn.q_proj, d_in), (attn.k_proj, d_in), (attn.v_proj, d_in),
                          (mlp.gate_proj, d_mid), (mlp.up_proj, d_mid)):
            set_weight(lin, lin.weight.new_empty(lin.out_features, n_in))
        for lin, n_out in ((attn.o_proj, d_mid), (mlp.down_proj, d_out)):
            bias = None if lin.bias is None else lin.bias.new_empty(n_out)
            set_weight(lin, lin.weight.new_empty(n_out, lin.in_features), bias)
        inner.layers[i] = SlicedDecoderLayer(layer, float(layout["eps"]), d, (d_in, d_mid, d_out))
    inner.norm = SlicedRMSNorm(d, float(layout["final_eps"]))
