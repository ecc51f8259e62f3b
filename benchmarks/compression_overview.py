"""Every compression method measured on SmolLM2-135M in one perplexity-vs-ratio plot and table.

Reads the committed results (nothing is recomputed): ``compress_smollm2.json`` (SVD, WeLore, LoRD, LoRD with
data, LoRAPrune; each also after its short recovery fine-tuning), ``slicegpt_smollm2.json``,
``dsnot_smollm2.json``, ``modegpt_smollm2.json``, ``ecoflap_smollm2.json`` (calibrated, training-free) and
``spqr_smollm2.json`` (4-bit-class quantization: not a weight ratio, so in the table with its bits per
parameter). The x axis is the kept fraction of the compressed weights as each benchmark counts it (SliceGPT's
includes its added shortcut matrices, so its 0.9 setting keeps more than the dense model); the y axis the
held-out perplexity (log), BBC News and stdlib code.

    python benchmarks/compression_overview.py   # writes benchmarks/results/compression_overview.{md,png}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rankwise.report import Column, markdown_table, save_figure, write_text

RESULTS = Path(__file__).parent / "results"
CALIBRATED = ("slicegpt", "dsnot", "modegpt", "ecoflap")


def rows() -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The dense model's perplexities and one row per measured setting."""
    main = json.loads((RESULTS / "compress_smollm2.json").read_text())
    out = []
    for r in main["rows"]:
        out.append({"method": r["method"], "stage": "one-shot", "kept": r["kept_fraction"], **_ppl(r["ppl"])})
        if r.get("ppl_recovered"):
            out.append({"method": r["method"], "stage": "recovered", "kept": r["kept_fraction"],
                        **_ppl(r["ppl_recovered"])})
    for name in CALIBRATED:
        for r in json.loads((RESULTS / f"{name}_smollm2.json").read_text())["rows"]:
            variant = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
            method = r.get("method", name)  # a control row of another method (ECoFLaP's uniform Wanda)
            if method != name:
                variant = f"{variant}; {name}'s control" if variant else f"{name}'s control"
            out.append({"method": method + (f" ({variant})" if variant else ""), "stage": "calibrated",
                        "kept": r["kept_fraction"], **_ppl(r["ppl"])})
    for r in json.loads((RESULTS / "spqr_smollm2.json").read_text())["rows"]:
        variant = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
        out.append({"method": "spqr" + (f" ({variant})" if variant else ""), "stage": "quantized", "kept": None,
                    "bits": r["details"]["bits_per_param"], **_ppl(r["ppl"])})
    return _ppl(main["base"]["ppl"]), out


def _ppl(ppl: dict[str, float]) -> dict[str, float]:
    return {"bbc": ppl["bbc"], "code": ppl["stdlib-code"]}


def plot(base: dict[str, float], table: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6), dpi=110)
    styles = {"one-shot": ":", "recovered": "-", "calibrated": "-"}
    names = sorted({r["method"] for r in table if r["kept"] is not None})
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}  # one colour per method
    for ax, key, title in zip(axes, ("bbc", "code"), ("BBC News", "stdlib code"), strict=True):
        series: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in table:
            if r["kept"] is not None:
                series.setdefault((r["method"], r["stage"]), []).append((r["kept"], r[key]))
        for (method, stage), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[stage], marker="o", ms=4, color=colors[method],
                    label=f"{method} ({stage})", alpha=0.5 if stage == "one-shot" else 0.9)
        ax.axhline(base[key], color="black", lw=0.8, ls="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("kept fraction of the compressed weights")
        ax.set_ylabel(f"held-out perplexity, {title} (log)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=5)
    fig.suptitle("SmolLM2-135M compression: every method measured (benchmarks/results/*_smollm2.json); "
                 "dotted: one-shot, solid: recovered or calibrated", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return save_figure(fig, path)


def main() -> None:
    base, table = rows()
    png = plot(base, table, RESULTS / "compression_overview.png")
    columns = [Column("method", "method", align="<"), Column("stage", "stage", align="<"),
               Column("kept", "kept fraction", lambda v: f"{v:.3f}"),
               Column("bits", "bits/param", lambda v: f"{v:.2f}"),
               Column("bbc", "BBC ppl", lambda v: f"{v:,.1f}"), Column("code", "code ppl", lambda v: f"{v:,.1f}")]
    ordered = sorted(table, key=lambda r: (r["stage"] == "one-shot", r["bbc"]))
    text = "\n".join([
        "# SmolLM2-135M compression: every method measured", "",
        f"Dense model: BBC {base['bbc']:.1f}, code {base['code']:.1f}. One-shot / recovered: "
        "`benchmarks/compress_smollm2.py` (recovered: after 16 steps of fine-tuning the method's own trainable "
        "part); calibrated: "
        "`benchmarks/calibrated_smollm2.py` (training-free, 16 calibration batches); quantized: SpQR at its bits "
        "per parameter. Sorted by BBC perplexity, one-shot rows last.", "",
        markdown_table(ordered, columns), "", f"![perplexity vs kept fraction]({png.name})", ""])
    print(write_text(RESULTS / "compression_overview.md", text))


if __name__ == "__main__":
    main()
