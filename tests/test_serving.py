"""s_lora (S-LoRA's memory scheme on one device): adapters live in host memory, a bounded pool holds
the ones batches need (least recently used evicted first). Faithful properties (METHODS.md): a batch
mixing adapters of different ranks matches each adapter run alone, and the device memory for adapters
stays within the pool however many adapters the host holds."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.io import adapter_tensors

from .conftest import lm_batches, make_tiny_llama

IDS = lm_batches(n=1, batch=4, seq=6, seed=3)[0]["input_ids"]
METHODS = ["lora", "rslora", "lora", "dora", "lora", "pissa"]


def _adapters():
    """One model holding 6 adapters of ranks 1..6 (lora, rslora, dora, pissa), B randomized."""
    model = make_tiny_llama(0)
    g = torch.Generator().manual_seed(0)
    for i, method in enumerate(METHODS):
        rw.adapt(model, method, r=i + 1, name=f"a{i}", seed=i)
        with torch.no_grad():
            for _, layer in rw.adapter_layers(model, f"a{i}"):
                layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model.eval()


def _bytes(model, name) -> int:
    return sum(t.numel() * t.element_size() for t in adapter_tensors(model, name).values())


@pytest.fixture(scope="module")
def source():
    return _adapters()


def _alone(source, name, ids):
    alone = copy.deepcopy(source)
    rw.set_active(alone, name)
    with torch.no_grad():
        return alone(input_ids=ids).logits


def test_mixed_batches_match_each_adapter_alone_within_a_bounded_pool(source):
    sizes = {f"a{i}": _bytes(source, f"a{i}") for i in range(6)}
    pool = sizes["a5"] + sizes["a4"] + 1  # room for about two adapters: six on the host
    server = rw.AdapterServer(make_tiny_llama(0), pool_bytes=pool)
    for name in sizes:
        server.register(name, source)
    base = make_tiny_llama(0)
    schedule = [["a0", "a5", None, "a0"], ["a3", "a3", "__base__", "a1"], ["a2", "a4", "a4", "a2"],
                ["a5", None, "a0", "a5"], ["a1", "a1", "a1", "a3"]]
    for names in schedule:
        out = server.serve(names, input_ids=IDS).logits
        assert server.resident_bytes <= pool
        assert sum(t.numel() * t.element_size() for t in server.model.parameters() if t.dtype.is_floating_point
                   ) - sum(p.numel() * p.element_size() for p in base.parameters()) <= pool + 1024
        for i, name in enumerate(names):
            want = (base(input_ids=IDS[i:i + 1]).logits if name in (None, "__base__")
                    else _alone(source, name, IDS[i:i + 1]))[0]
            torch.testing.assert_close(out[i], want, atol=1e-5, rtol=1e-5)
    assert server.stats.peak_resident_bytes <= pool
    assert server.stats.evictions >= 3 and server.stats.misses >= 6
    assert rw.adapter_names(server.model) == list(server.resident) and len(server.resident) < 6


def test_least_recently_used_adapter_is_evicted_first(source):
    sizes = [_bytes(source, f"a{i}") for i in (0, 1, 2)]
    server = rw.AdapterServer(make_tiny_llama(0), pool_bytes=sizes[0] + sizes[1] + sizes[2] - 1)
    for i in (0, 1, 2):
        server.register(f"a{i}", source)
    server.serve(["a0", "a1"], input_ids=IDS[:2])
    server.serve(["a0"], input_ids=IDS[:1])  # a0 is now the most recently used
    server.serve(["a2"], input_ids=IDS[:1])  # no room for three: a1 goes
    assert list(server.resident) == ["a0", "a2"] and rw.adapter_names(server.model) == ["a0", "a2"]
    assert (server.stats.hits, server.stats.misses, server.stats.evictions) == (1, 3, 1)


def test_registering_from_a_directory_and_bad_input(source, tmp_path):
    rw.save_adapter(source, tmp_path / "a3", name="a3")
    server = rw.AdapterServer(make_tiny_llama(0), pool_bytes=10**8)
    server.register("x", tmp_path / "a3")
    torch.testing.assert_close(server.serve(["x"], input_ids=IDS[:1]).logits, _alone(source, "a3", IDS[:1]))
    with pytest.raises(ValueError, match="unregistered adapter.*'nope'"):
        server.serve(["nope"], input_ids=IDS[:1])
    with pytest.raises(ValueError, match="registered already"):
        server.register("x", tmp_path / "a3")
    with pytest.raises(FileNotFoundError, match="rw.save_adapter"):
        server.register("y", tmp_path)
    with pytest.raises(ValueError, match="model holds adapters"):
        rw.AdapterServer(copy.deepcopy(source), pool_bytes=10)
    with pytest.raises(ValueError, match="pool_bytes"):
        rw.AdapterServer(make_tiny_llama(0), pool_bytes=0)
    small = rw.AdapterServer(make_tiny_llama(0), pool_bytes=_bytes(source, "a0") + _bytes(source, "a1") - 1)
    small.register("a0", source)
    small.register("a1", source)
    with pytest.raises(ValueError, match="need more than pool_bytes"):
        small.serve(["a0", "a1"], input_ids=IDS[:2])
    with pytest.raises(ValueError, match="more than pool_bytes"):
        rw.AdapterServer(make_tiny_llama(0), pool_bytes=10).register("a0", source)


def test_s_lora_is_catalogued_as_serving():
    record = rw.catalogue.get("s_lora")
    assert record.status == "done" and record.api == "serve"
    server = record.build(make_tiny_llama(0), pool_bytes=1000)
    assert isinstance(server, rw.AdapterServer) and server.pool_bytes == 1000
