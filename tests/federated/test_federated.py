"""Federated LoRA (``rw.federate``): exact aggregation where the papers say so (FFA-LoRA, Fed-SB, FedSVD),
FedAvg of A and B inexact, FedSVD's orthonormal re-factorization, upload sizes, determinism, bad input."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise import catalogue
from rankwise.federated import FederatedConfig, Federation, shard_indices, svd_refactor

from ..conftest import cls_batches, make_tiny_bert

CLIENTS = 3


def _federation(method: str, clients: int = CLIENTS, seed: int = 0, **options) -> Federation:
    """Clients on different random data (so their updates diverge), a large lr so they diverge a lot."""
    data = [cls_batches(n=3, seed=100 + k) for k in range(clients)]
    cfg = FederatedConfig(**{"rounds": 2, "local_steps": 3, "r": 2, "lr": 0.05, "seed": seed, "device": None,
                             "progress": False, **options})
    return Federation(make_tiny_bert(), method, data, cfg)


def _deltas(fed: Federation) -> dict[str, torch.Tensor]:
    return {name: layer.delta_weight().detach().double().clone() for name, layer in rw.adapter_layers(fed.model)}


def _client_deltas(fed: Federation, uploads: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each client's ΔW: the broadcast state with its upload written over it."""
    out = []
    for upload in uploads:
        fed.load(fed.global_state)
        fed.load(upload)
        out.append(_deltas(fed))
    fed.load(fed.global_state)
    return out


def _aggregation_gap(fed: Federation) -> tuple[float, float]:
    """One round: (max |ΔW_global − mean ΔW_i| / max |ΔW|, max spread between the clients' ΔW / max |ΔW|)."""
    uploads = fed.local_round()
    clients = _client_deltas(fed, uploads)
    fed.aggregate(uploads)
    glob = _deltas(fed)
    gap = spread = size = 0.0
    for name, dw in glob.items():
        mean = torch.stack([c[name] for c in clients]).mean(0)
        size = max(size, float(mean.abs().max()))
        gap = max(gap, float((dw - mean).abs().max()))
        spread = max(spread, max(float((c[name] - mean).abs().max()) for c in clients))
    return gap / size, spread / size


@pytest.mark.parametrize("method", ["ffa_lora", "fed_sb", "fedsvd"])
def test_global_update_is_the_exact_mean_of_the_clients_updates(method):
    fed = _federation(method)
    for _ in range(2):  # the second round starts from a non-zero, (for FedSVD) re-factorized state
        gap, spread = _aggregation_gap(fed)
        assert spread > 0.05, "the clients did not diverge: the check would be vacuous"
        assert gap < 1e-5, f"{method}: B̄·A (or B·R̄·A) differs from the mean client update by {gap:.2e}"


def test_fedavg_of_a_and_b_is_not_the_mean_update():
    gap, spread = _aggregation_gap(_federation("fedavg"))
    assert spread > 0.05
    assert gap > 1e-3, "mean(B)·mean(A) should differ from mean(B·A) when the clients' A differ"


def _lora_A(fed: Federation) -> list[torch.Tensor]:
    return [layer.lora_A.detach().clone() for _, layer in rw.adapter_layers(fed.model)]


def test_ffa_lora_keeps_a_at_its_init_and_uploads_only_b():
    fed = _federation("ffa_lora")
    a0 = _lora_A(fed)
    layers = rw.adapter_layers(fed.model)
    assert all(not layer.lora_B.detach().any() for _, layer in layers)  # B starts at zero
    fed.aggregate(fed.local_round())
    assert all(torch.equal(a, b) for a, b in zip(a0, _lora_A(fed), strict=True))
    head = sum(p.numel() for n, p in fed.model.named_parameters() if n.startswith("classifier"))
    lora_b = sum(layer.lora_B.numel() for _, layer in layers)
    assert fed.floats(fed.uploaded) == lora_b + head
    fedavg = _federation("fedavg")
    assert fedavg.floats(fedavg.uploaded) == lora_b + head + sum(layer.lora_A.numel() for _, layer in layers)


def test_fed_sb_uploads_r_squared_numbers_per_layer():
    fed = _federation("fed_sb", r=3)
    layers = rw.adapter_layers(fed.model)
    head = sum(p.numel() for n, p in fed.model.named_parameters() if n.startswith("classifier"))
    assert fed.floats(fed.uploaded) == 9 * len(layers) + head
    b0 = [layer.frozen_B.clone() for _, layer in layers]
    fed.aggregate(fed.local_round())
    assert all(torch.equal(b, layer.frozen_B) for b, (_, layer) in zip(b0, layers, strict=True))


def test_fedsvd_refactor_keeps_the_product_and_orthonormalizes_a():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(20, 4, generator=g), torch.randn(4, 30, generator=g)
    b2, a2 = svd_refactor(b, a)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-5)
    assert torch.allclose(a2 @ a2.T, torch.eye(4), atol=1e-6)
    assert torch.all(b2.norm(dim=0)[:-1] >= b2.norm(dim=0)[1:])  # columns ordered by singular value


def test_fedsvd_broadcasts_an_orthonormal_a_that_follows_the_updates():
    fed = _federation("fedsvd")
    a0 = _lora_A(fed)
    assert len(fed.pairs) == len(a0), "the server must re-factorize every layer"
    for _ in range(2):
        uploads = fed.local_round()
        n_b, n_a = fed.pairs[0]
        b_mean = torch.stack([u[n_b] for u in uploads]).mean(0)
        before = b_mean.double() @ fed.global_state[n_a].double()
        fed.aggregate(uploads)
        after = fed.global_state[n_b].double() @ fed.global_state[n_a].double()
        assert torch.allclose(after, before, atol=1e-6)
        for a in _lora_A(fed):
            assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-5)
    assert not any(torch.allclose(a, b) for a, b in zip(a0, _lora_A(fed), strict=True))
    assert fed.floats(fed.broadcast) > fed.floats(fed.uploaded)  # A travels down, never up


def test_runs_are_deterministic_in_the_seed():
    def final(seed: int) -> dict[str, torch.Tensor]:
        fed = _federation("fedavg", seed=seed)
        fed.run()
        return fed.global_state

    one, two, other = final(0), final(0), final(1)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)


def test_federate_runs_rounds_and_evaluates():
    model = make_tiny_bert()
    data = [cls_batches(n=2, seed=k) for k in range(2)]
    seen = []
    result = rw.federate(model, "ffa_lora", data, cls_batches(n=1, seed=9), rounds=2, local_steps=2, r=2,
                         eval_every=1, progress=False, on_round=seen.append)
    assert [h["round"] for h in result.history] == [1, 2] == [s["round"] for s in seen]
    assert "accuracy" in result.history[0] and "accuracy" in result.metrics
    assert result.clients == 2 and result.upload_floats < result.download_floats + 1
    assert rw.adapter_state(model).method == "lora"


def test_catalogue_records_and_builder():
    names = [r.name for r in catalogue.records("federated", "done")]
    assert names == ["ffa_lora", "fed_sb", "fedsvd"]
    assert set(rw.federated.FEDERATED_METHODS) == set(names)
    result = catalogue.get("fedsvd").build(make_tiny_bert(), clients=[cls_batches(n=1)], rounds=1, local_steps=1,
                                           r=2, progress=False)
    assert result.method == "fedsvd" and len(result.history) == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "fedprox"}, r"method='fedprox' is not allowed; choose one of \['fedavg', 'ffa_lora'"),
    ({"rounds": 0}, "rounds=0 must be an integer >= 1"),
    ({"local_steps": 1.5}, "local_steps=1.5"),
    ({"lr": -1.0}, "lr=-1.0"),
    ({"optimizer": "nope"}, "optimizer='nope' is not allowed"),
    ({"no_such_option": 1}, r"unknown option\(s\) \['no_such_option'\]"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"method": "fed_sb", "alpha": 16}, "alpha=16 applies to the LoRA-based methods"),
    ({"clients": []}, r"clients=\[\]"),
    ({"clients": None}, "clients=None"),
])
def test_bad_input_names_the_parameter(kwargs, match):
    args = {"method": "ffa_lora", "clients": [cls_batches(n=1)], "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        rw.federate(make_tiny_bert(), **args)


def test_shards_are_disjoint_deterministic_and_skewable():
    labels = [i % 4 for i in range(400)]
    iid = shard_indices(labels, 4, seed=0)
    assert sorted(i for s in iid for i in s) == list(range(400))
    assert [len(s) for s in iid] == [100] * 4 and iid == shard_indices(labels, 4, seed=0)
    assert iid != shard_indices(labels, 4, seed=1)
    skewed = shard_indices(labels, 4, seed=0, skew=0.1)
    assert sorted(i for s in skewed for i in s) == list(range(400))

    def top_share(shards):  # the largest class's share, averaged over the clients
        return sum(max(sum(labels[i] == c for i in s) for c in range(4)) / len(s) for s in shards) / len(shards)

    assert top_share(iid) < 0.4 < 0.7 < top_share(skewed)
    with pytest.raises(ValueError, match="clients=0"):
        shard_indices(labels, 0)
    with pytest.raises(ValueError, match="skew=0"):
        shard_indices(labels, 2, skew=0)


@pytest.mark.parametrize("method", ["ffa_lora", "fed_sb", "fedsvd"])
def test_global_adapter_exports_to_peft(method, tmp_path):
    """The catalogue's ``exports="peft-lora"``: the global model after two rounds, loaded by PEFT on the
    untouched base, gives the same logits."""
    from peft import PeftModel

    fed = _federation(method)
    fed.run()
    batch = cls_batches(n=1, seed=5)[0]
    with torch.no_grad():
        expected = fed.model(**batch).logits
    rw.export_peft(fed.model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(make_tiny_bert(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-4, rtol=0)
