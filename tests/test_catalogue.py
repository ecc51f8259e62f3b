"""The method catalogue: one record per method, the packages' tables are views of it, the README
tables are generated from it, and the families agree with the project's reading of the papers."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

import rankwise as rw
from rankwise import catalogue
from rankwise.adapters.registry import MethodSpec
from rankwise.optim.projected import ProjectedOptimizer

ROOT = Path(__file__).resolve().parents[1]


def test_every_done_record_is_complete():
    done = catalogue.records(status="done")
    assert len({r.name for r in done}) == len(done)
    for r in done:
        assert r.family in catalogue.FAMILIES and r.api in catalogue.APIS, r.name
        assert r.paper and r.mechanism and r.builder is not None, r.name


def test_families_agree_with_the_catalogue_file():
    with (ROOT / "src" / "rankwise" / "catalogue.tsv").open(encoding="utf-8") as f:
        listed = {row["name"]: row["family"] for row in csv.DictReader(f, delimiter="\t")}
    assert len(listed) == 177
    done = catalogue.records(status="done")
    assert sum(r.name in listed for r in done) >= 36
    for r in done:
        if r.name in listed:
            assert r.family == listed[r.name], r.name
    assert {r.name for r in catalogue.records()} >= set(listed)


def test_package_tables_are_views_of_the_catalogue():
    done = catalogue.records(status="done")
    assert list(rw.REGISTRY) == [r.name for r in done if isinstance(r.spec, MethodSpec)]
    optim = {r.name for r in done if r.api == "optim"}
    assert set(rw.optim.factory.OPTIMIZERS) | set(rw.optim.factory.SAMPLERS) == optim
    assert set(rw.sparse.SPARSE_METHODS) == {r.name for r in done if r.api == "sparsify"}
    assert set(rw.compression.COMPRESS_METHODS) == {r.name for r in done if r.api == "compress"}


def test_registration_does_not_depend_on_import_order():
    code = "import rankwise.adapters as a; assert 'dsee' in a.REGISTRY, list(a.REGISTRY)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="'lora' is registered twice"):
        catalogue.register(catalogue.get("lora"))


def test_lookups_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"family='adapters' is not allowed; choose one of \['adapter'"):
        catalogue.records(family="adapters")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        catalogue.get("nope")
    planned = catalogue.records(status="planned")[0]
    with pytest.raises(ValueError, match="planned: not implemented"):
        planned.build(None)


def test_builder_applies_the_method():
    from .conftest import make_tiny_bert

    model = catalogue.get("lora").build(make_tiny_bert(), r=2)
    assert rw.adapter_state(model).method == "lora"
    opt = catalogue.get("galore").build(make_tiny_bert(), rank=2, lr=1e-3)
    assert isinstance(opt, rw.optim.GaLoreAdamW)


def test_readme_tables_are_generated_from_the_catalogue():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert catalogue.replace_readme_section(text) == text, "README method tables are stale: run `make readme`"


@pytest.mark.parametrize("name", [r.name for r in catalogue.records(status="done")])
def test_every_method_names_an_unknown_option(name):
    """Generic bad input, for every catalogued method: an option it does not have is an error naming it."""
    from .conftest import make_tiny_llama

    record = catalogue.get(name)
    fits = {"rank": 4} if isinstance(record.config, type) and issubclass(record.config, ProjectedOptimizer) else {}
    with pytest.raises((TypeError, ValueError), match="no_such_option"):
        record.build(make_tiny_llama(), no_such_option=1, **fits)
