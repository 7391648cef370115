"""Methods compared from the same start: one run per method, a table, a figure.

:func:`compare` trains every method with one config (only ``config.method`` differs, so
pretraining, schedule, steps and seed are shared), then writes ``comparison.json``,
``comparison.md`` and ``comparison.png`` in the workdir.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_collections
from etils import epath

from ccnn_jax import configs, reporting, run

#: The fields of each row of ``comparison.json``.
ROW_KEYS = ("method", "miou", "pixel_accuracy", "per_class_iou", "steps", "seconds")


def method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """``config`` with ``method`` (every other field unchanged)."""
    if method not in configs.METHODS or method == "pretrain":
        raise ValueError(f"methods: expected names from {configs.METHODS[:4]}, got {method!r}")
    c = config.copy_and_resolve_references()
    c.method = method
    return c


def compare(
    config: ml_collections.ConfigDict,
    methods: Sequence[str],
    workdir: epath.PathLike,
    *,
    paper: Mapping[str, float] | None = None,
    progress: bool = True,
) -> str:
    """Trains (or resumes, or reuses) ``<workdir>/<method>`` for each method and writes the
    comparison files; returns the markdown table. ``paper`` maps a method to the paper's mIoU
    (any scale) for the ratio-to-full column."""
    if not methods:
        raise ValueError("methods: expected at least one method")
    cfgs = [method_config(config, m) for m in methods]  # all names checked before training
    workdir = run.absolute(workdir)
    rows, grids = [], {}
    for c in cfgs:
        results = run.train_and_evaluate(c, workdir / c.method, progress=progress)
        rows.append({k: results[k] for k in ROW_KEYS})
        grids[c.method] = reporting.read_npz(workdir / c.method / "predictions.npz")
    reporting.write_json(workdir / "comparison.json", {"seed": int(config.seed), "rows": rows})
    class_names = results["class_names"]
    table = comparison_markdown(rows, paper or {}, class_names, seed=int(config.seed))
    (workdir / "comparison.md").write_text(table)
    first = grids[cfgs[0].method]
    panels = {"image": first["image"], "ground truth": first["ground truth"]}
    panels.update({m: g["prediction"] for m, g in grids.items()})
    title = f"{config.dataset}, seed {int(config.seed)}: validation predictions per method"
    reporting.save_grid(
        workdir / "comparison.png",
        panels,
        class_names=class_names,
        title=title,
        panels_as_rows=True,
    )
    return table


def comparison_markdown(
    rows: Sequence[Mapping], paper: Mapping[str, float], class_names: Sequence[str], *, seed: int
) -> str:
    """The table (mIoU, pixel accuracy, ratio to ``full`` — ours and the paper's —, steps,
    seconds) and the per-class IoU of every method."""
    full = next((r["miou"] for r in rows if r["method"] == "full"), None)
    lines = [
        f"seed {seed}",
        "",
        "| method | mIoU | pixel acc. | / full | paper / full | steps | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if not full else f"{r['miou'] / full:.2f}"
        ref = paper.get(r["method"]), paper.get("full")
        paper_ratio = f"{ref[0] / ref[1]:.2f}" if None not in ref else ""
        lines.append(
            f"| {r['method']} | {r['miou']:.3f} | {r['pixel_accuracy']:.3f} | {ratio} | "
            f"{paper_ratio} | {r['steps']} | {r['seconds']:.0f} |"
        )
    lines += ["", "| method | " + " | ".join(class_names) + " |"]
    lines.append("|---" * (len(class_names) + 1) + "|")
    for r in rows:
        ious = ["–" if v is None else f"{v:.3f}" for v in r["per_class_iou"]]
        lines.append(f"| {r['method']} | " + " | ".join(ious) + " |")
    return "\n".join(lines) + "\n"
