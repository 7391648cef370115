"""Run outputs: JSON-lines + TensorBoard metric logging, results.json, PNG figures, markdown.

Figures use matplotlib's Agg backend (no display needed). Label maps are drawn with a fixed
palette (one colour per class, void in white) so panels are comparable across runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from ccnn_jax.data.common import VOID

# ----------------------------------------------------------------------------- metric logging


class MetricWriter:
    """Appends ``{"step": s, **scalars}`` lines to ``<workdir>/metrics.jsonl`` + TensorBoard.

    ``resume_step``: lines of an interrupted run with step > resume_step are dropped and
    TensorBoard events after it purged, so the logs match the restored state.
    """

    def __init__(self, workdir: epath.PathLike, *, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        _atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(
            os.fspath(epath.Path(workdir) / "tensorboard"), purge_step=resume_step + 1
        )

    def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({f"{prefix}{k}": _to_float(v) for k, v in scalars.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and v is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, global_step=int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: epath.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file ([] when it does not exist)."""
    path = epath.Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from None
    return rows


def _to_float(v) -> float | None:
    v = float(np.asarray(v))
    return v if math.isfinite(v) else None


def _atomic_write_text(path: epath.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: epath.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically (NaN/inf become null)."""

    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    _atomic_write_text(epath.Path(path), json.dumps(clean(obj), indent=2) + "\n")


# ----------------------------------------------------------------------------- markdown


def write_npz(path: epath.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez_compressed`` of ``arrays`` (keys as given), written atomically."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    with tmp.open("wb") as f:
        np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)


def read_npz(path: epath.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file written by :func:`write_npz`."""
    with epath.Path(path).open("rb") as f, np.load(f) as data:
        return {k: data[k] for k in data.files}


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table; floats get 3 decimals, None an em dash."""

    def fmt(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def per_class_markdown(results: Mapping[str, Any]) -> str:
    """Per-class IoU table of one results dict (``class_names``, ``per_class_iou``)."""
    rows = [
        {"class": n, "IoU": v}
        for n, v in zip(results["class_names"], results["per_class_iou"], strict=True)
    ]
    return markdown_table(rows, ["class", "IoU"])


# ----------------------------------------------------------------------------- figures


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: classes from tab10/tab20, void (255) white, others grey."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    pal = np.full((256, 3), 128, np.uint8)
    for k in range(min(num_classes, 255)):
        pal[k] = (np.asarray(cmap(k % cmap.N)[:3]) * 255).astype(np.uint8)
    pal[VOID] = 255
    return pal


def colorize(labels_HxW: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels_HxW)
    return palette(num_classes)[np.clip(labels, 0, 255).astype(np.int64)]


def save_grid(
    path: epath.PathLike,
    panels: Mapping[str, np.ndarray],
    *,
    class_names: Sequence[str],
    title: str | None = None,
    panels_as_rows: bool = False,
) -> None:
    """Rows of examples, one column per panel, e.g. image | ground truth | prediction | latent
    (``panels_as_rows=True``: one row per panel, e.g. one per method, examples across).

    ``panels`` maps a panel title to an array (R, H, W, 3) float in [0, 1] (an image) or
    (R, H, W) int (a label map, drawn with :func:`palette`). A legend names the class colours.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not panels:
        raise ValueError("panels: expected at least one column")
    names = list(panels)
    rows = {len(panels[n]) for n in names}
    if len(rows) != 1:
        raise ValueError(f"panels: every column needs the same number of rows, got {rows}")
    num_examples = rows.pop()
    k = len(class_names)
    shape = (len(names), num_examples) if panels_as_rows else (num_examples, len(names))
    fig, axes = plt.subplots(*shape, figsize=(2.0 * shape[1], 2.0 * shape[0] + 0.8), squeeze=False)
    for c, name in enumerate(names):
        for r in range(num_examples):
            x = np.asarray(panels[name][r])
            ax = axes[c, r] if panels_as_rows else axes[r, c]
            ax.imshow(np.clip(x, 0, 1) if x.ndim == 3 else colorize(x, k), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if panels_as_rows and r == 0:
                ax.set_ylabel(name, fontsize=9)
            elif not panels_as_rows and r == 0:
                ax.set_title(name, fontsize=9)
    handles = [Patch(color=palette(k)[i] / 255.0, label=n) for i, n in enumerate(class_names)]
    handles.append(Patch(facecolor="white", edgecolor="black", label="void"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97 if title else 1))
    _save_fig(fig, path)


def save_curves(
    path: epath.PathLike,
    rows: Iterable[Mapping[str, Any]],
    keys: Sequence[str],
    *,
    title: str | None = None,
) -> None:
    """One subplot per metric key, value against step (rows from metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        raise ValueError("save_curves: none of the requested metrics was logged")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        steps, values = zip(*pts, strict=True)
        ax.plot(steps, values, marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: epath.PathLike) -> None:
    import matplotlib.pyplot as plt

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp.png"
    fig.savefig(os.fspath(tmp), dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
