"""Model layout: where a transformer keeps its blocks, attention heads and output heads.

* Output heads: the Hugging Face task-head names (:data:`HEAD_NAMES`; the sequence-classification
  ones are :data:`CLASSIFIER_NAMES`) and :func:`head_module_names`.
* Transformer blocks: :func:`transformer_blocks` cuts a model into embedding, repeated layers and
  head (the unit of block / layer sampling optimizers).
* Attention: :func:`attention_layout` finds every Llama- or BERT-style block by its query projection
  (:data:`STYLES`), :func:`check_head_layout` checks its q/k/o shapes against the config's head
  counts, and :func:`find_blocks` lists each block's attention and MLP linears as a :class:`Block`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BERT", "Block", "CLASSIFIER_NAMES", "EMBEDDING", "HEAD", "HEAD_NAMES", "LLAMA", "STYLES", "attention_layout",
    "check_head_layout", "find_blocks", "head_module_names", "layer_list", "module_tensor", "transformer_blocks",
    "unwrap",
]

# Hugging Face sequence-classification heads: what adapters train in full next to the adapters.
CLASSIFIER_NAMES = ("classifier", "score")
# Every Hugging Face task-head name; "all-linear" targets never adapt them.
HEAD_NAMES = ("lm_head", *CLASSIFIER_NAMES, "qa_outputs", "cls")

# The names transformer_blocks gives the parameters before and after the repeated layers.
EMBEDDING = "embedding"
HEAD = "head"


# ------------------------------------------------------------------------------------- output heads
def head_module_names(model: nn.Module) -> set[str]:
    """Full names of output-head modules: the output embeddings plus known task heads."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            names.add(name)
        if name.split(".")[-1] in HEAD_NAMES or name.split(".")[0] in HEAD_NAMES:
            names.add(name)
    return names


# ------------------------------------------------------------------------------------- transformer blocks
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def layer_list(model: nn.Module, layers: str | None = None) -> tuple[str, nn.Module]:
    """``(dotted name, module)`` of the repeated transformer layers: ``layers`` when given, else the
    ``nn.ModuleList`` of at least two same-type modules holding the most parameters."""
    if layers is not None:
        if not isinstance(layers, str):
            raise ValueError(f"layers={layers!r} must be the dotted name of the layer list, e.g. 'model.layers'")
        try:
            found = model.get_submodule(layers)
        except AttributeError as err:
            raise ValueError(f"layers={layers!r} is not a submodule of {type(model).__name__}") from err
        if not isinstance(found, nn.ModuleList | nn.Sequential) or len(found) == 0:
            raise ValueError(f"layers={layers!r} must name a non-empty nn.ModuleList, got {type(found).__name__}")
        return layers, found
    best: tuple[int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"found no repeated transformer layers in {type(model).__name__} (an nn.ModuleList of at "
            "least 2 modules of one type); pass layers='<dotted name>', e.g. layers='model.layers'"
        )
    return best[1], best[2]


class _ParamView(nn.Module):
    """Holds references to parameters whose owning module also contains the layer list."""

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]]):
        super().__init__()
        for name, param in named:
            self.register_parameter(name.replace(".", "__"), param)


def _group_module(model: nn.Module, names: list[str], layers_name: str) -> nn.Module:
    """A view (not attached to ``model``) over the modules owning the parameters ``names``."""
    params = dict(model.named_parameters())
    owners: list[str] = []
    loose: list[tuple[str, nn.Parameter]] = []
    for name in names:
        owner = name.rpartition(".")[0]
        contains_layers = owner == "" or layers_name.startswith(owner + ".")
        if contains_layers:
            loose.append((name, params[name]))
        elif owner not in owners and not any(owner.startswith(o + ".") for o in owners):
            owners.append(owner)
    members: list[nn.Module] = [model.get_submodule(o) for o in owners]
    if loose:
        members.append(_ParamView(loose))
    return nn.ModuleList(members)


def transformer_blocks(model: nn.Module, layers: str | None = None) -> list[tuple[str, nn.Module]]:
    """The model cut into ``[("embedding", ·), (<layer name>, layer) ..., ("head", ·)]``.

    The repeated layers are the ``nn.ModuleList`` of same-type modules holding the most parameters
    (``model.layers``, ``bert.encoder.layer``, ``transformer.h``; or pass ``layers=`` explicitly).
    Every other parameter goes to ``"embedding"`` when it is registered before the first layer and to
    ``"head"`` otherwise (final norm, LM head, pooler, classifier). Those two groups are
    ``nn.ModuleList`` views over their owning modules (tied weights appear once, in the embedding);
    a group without parameters is left out. DDP / DataParallel wrappers are looked through.
    """
    model = unwrap(model)
    layers_name, repeated = layer_list(model, layers)
    in_layers = {id(p) for p in repeated.parameters()}
    before: list[str] = []
    after: list[str] = []
    seen_layer = False
    for name, param in model.named_parameters():
        if id(param) in in_layers:
            seen_layer = True
        else:
            (after if seen_layer else before).append(name)
    blocks: list[tuple[str, nn.Module]] = []
    if before:
        blocks.append((EMBEDDING, _group_module(model, before, layers_name)))
    blocks.extend((f"{layers_name}.{i}", layer) for i, layer in enumerate(repeated))
    if after:
        blocks.append((HEAD, _group_module(model, after, layers_name)))
    return blocks


# ------------------------------------------------------------------------------------- attention blocks
# Module names, relative to a block, of the attention projections and the two sides of the MLP.
LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "mlp_out": ("mlp.gate_proj", "mlp.up_proj"), "mlp_in": ("mlp.down_proj",)}
BERT = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "mlp_out": ("intermediate.dense",), "mlp_in": ("output.dense",)}
STYLES = {"llama": LLAMA, "bert": BERT}


@dataclass
class Block:
    """One transformer block's attention and MLP linears (full module names), its head layout and
    the weights each unit (query head, key-value head, MLP channel) holds in them."""

    q: str
    k: str
    v: str
    o: str
    mlp_out: tuple[str, ...]  # output-channel side of the MLP (gate, up / intermediate)
    mlp_in: tuple[str, ...]  # input-channel side (down / output)
    heads: int
    kv_heads: int
    head_dim: int
    channels: int
    head_weights: int = 0  # weights of one query head (its q rows + o columns)
    kv_weights: int = 0  # weights of one key-value head (its k rows + v rows)
    channel_weights: int = 0  # weights of one MLP channel
    total: int = 0  # all weights of the block's linears

    @property
    def group(self) -> int:
        """Query heads per key-value head."""
        return self.heads // self.kv_heads

    @property
    def names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o, *self.mlp_out, *self.mlp_in)


def attention_layout(model: nn.Module, who: str, what: str) -> list[tuple[dict, str, int, int, int | None]]:
    """``(style, prefix, heads, kv_heads, config head_dim)`` of every Llama- or BERT-style block of
    ``model``, found by its query projection; heads from ``model.config``. ``who`` / ``what`` name
    the caller and the structure it looks for in the errors (none found, no head count)."""
    found = [
        (style, name[: -len(style["q"])])
        for style in STYLES.values()
        for name, _ in model.named_modules()
        if name == style["q"] or name.endswith("." + style["q"])
    ]
    if not found:
        raise ValueError(f"{who} found no {what} in the model")
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if heads is None:
        raise ValueError(f"{who} needs model.config.num_attention_heads to find the attention heads")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return [(style, prefix, heads, kv_heads, getattr(cfg, "head_dim", None)) for style, prefix in found]


def check_head_layout(prefix: str, q: nn.Module, k: nn.Module, o: nn.Module, heads: int, kv_heads: int,
                      head_dim: int | None) -> int:
    """The head dimension (the config's, else q's rows per head); ValueError when the q/k/o shapes
    do not split into ``heads`` / ``kv_heads`` heads of that size."""
    head_dim = head_dim or q.out_features // heads
    if (q.out_features != heads * head_dim or o.in_features != heads * head_dim
            or k.out_features != kv_heads * head_dim or heads % kv_heads):
        raise ValueError(f"head layout of '{prefix}' does not match the config ({heads} heads, {kv_heads} kv heads, "
                         f"head_dim {head_dim})")
    return head_dim


def find_blocks(model: nn.Module, who: str = "find_blocks") -> list[Block]:
    """Every Llama-style (``self_attn.{q,k,v,o}_proj`` + ``mlp.{gate,up,down}_proj``) or BERT-style
    (``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``,
    ``output.dense``) block. ValueError (naming the caller ``who``) when the model has none or the
    head layout is inconsistent."""
    modules = dict(model.named_modules())
    layout = attention_layout(model, who, "Llama-style (self_attn.q_proj, ..., mlp.down_proj) or BERT-style "
                              "(attention.self.query, ..., output.dense) transformer block")
    blocks = []
    for style, prefix, heads, kv_heads, cfg_head_dim in layout:
        members = {key: prefix + style[key] for key in ("q", "k", "v", "o")}
        mlp_out = tuple(prefix + n for n in style["mlp_out"])
        mlp_in = tuple(prefix + n for n in style["mlp_in"])
        lin = {}
        for full in (*members.values(), *mlp_out, *mlp_in):
            module = modules.get(full)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{who} expects '{full}' to be an nn.Linear, got {type(module).__name__}")
            lin[full] = module
        q, k, o = lin[members["q"]], lin[members["k"]], lin[members["o"]]
        head_dim = check_head_layout(prefix, q, k, o, heads, kv_heads, cfg_head_dim)
        channels = lin[mlp_out[0]].out_features
        block = Block(**members, mlp_out=mlp_out, mlp_in=mlp_in, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, channels=channels)
        block.head_weights = head_dim * (q.in_features + o.out_features)
        block.kv_weights = head_dim * (k.in_features + lin[members["v"]].in_features)
        block.channel_weights = sum(lin[n].in_features for n in mlp_out) + sum(lin[n].out_features for n in mlp_in)
        block.total = sum(m.weight.numel() for m in lin.values())
        blocks.append(block)
    return blocks


def module_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor attribute ``name`` of ``module`` (a parameter or buffer such as ``weight``, ``lora_A``),
    checked to be a tensor: the typed way to read what ``nn.Module.__getattr__`` returns."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{type(module).__name__}.{name} is not a tensor")
    return value
