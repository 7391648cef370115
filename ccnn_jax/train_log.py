"""The training log of a run: window means of the step metrics (``metrics.jsonl``,
TensorBoard), a progress bar, and the check for non-finite steps before a window is written."""

from __future__ import annotations

import time

import jax
import numpy as np

from ccnn_jax import checkpoint as checkpoint_lib
from ccnn_jax import metrics, reporting
from ccnn_jax import train as train_lib
from ccnn_jax.stops import NonFiniteError


class TrainLog:
    """Window means of the step metrics every ``config.log_every`` steps (metrics.jsonl and
    TensorBoard, main process only) and a progress bar; checks the window for non-finite
    steps (:func:`ccnn_jax.train.train_step`'s ``nonfinite``) before writing it."""

    def __init__(self, workdir, config, *, start_step: int, progress: bool):
        is_main = jax.process_index() == 0
        self.writer = reporting.MetricWriter(workdir, resume_step=start_step, enabled=is_main)
        self.every = max(int(config.log_every), 1)
        self.pending: list[tuple[int, dict]] = []
        self.bar = None
        if progress and is_main and start_step < int(config.num_steps):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=int(config.num_steps),
                initial=start_step,
                desc=f"train {config.method}",
                dynamic_ncols=True,
                mininterval=1.0,
            )
        self.t_window = time.time()

    def add(self, step: int, step_metrics: dict) -> None:
        """Keeps a step's metrics (device arrays, not synchronised) for the next window."""
        self.pending.append((step, step_metrics))
        if self.bar is not None:
            self.bar.update(1)

    def first_nonfinite(self) -> tuple[int, list[str]] | None:
        """(step, quantities) of the first pending step that was not applied, or None."""
        codes = jax.device_get([m["nonfinite"] for _, m in self.pending])
        for (step, _), code in zip(self.pending, codes, strict=True):
            if int(code):
                return step, train_lib.nonfinite_names(code)
        return None

    def flush(self) -> None:
        """Writes the window means of the pending steps (call after :meth:`first_nonfinite`)."""
        if not self.pending:
            return
        rows = jax.device_get([m for _, m in self.pending])
        row = summarize_train(rows, time.time() - self.t_window)
        step = self.pending[-1][0]
        self.pending, self.t_window = [], time.time()
        self.writer.write(step, row, prefix="train/")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", miou=f"{row['miou']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def summarize_train(rows: list[dict], seconds: float) -> dict[str, float]:
    """Window means of scalar metrics; mIoU / accuracy from the summed confusion matrices."""
    confusion = np.sum([r["confusion"] for r in rows], axis=0)
    skip = ("confusion", "nonfinite")
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in skip}
    if "solver_violation" in out:
        out["solver_violation"] = float(np.max([r["solver_violation"] for r in rows]))
    out["miou"] = metrics.mean_iou(confusion)
    out["pixel_accuracy"] = metrics.pixel_accuracy(confusion)
    out["steps_per_second"] = len(rows) / max(seconds, 1e-9)
    return out


def raise_if_nonfinite(log: TrainLog, ckpt: checkpoint_lib.Checkpointer) -> None:
    """NonFiniteError naming the first non-finite pending step, its quantities and the
    checkpoint the run can go back to."""
    bad = log.first_nonfinite()
    if bad is None:
        return
    step, names = bad
    saved = ckpt.all_steps()
    kept = f"latest checkpoint: step {saved[-1]}" if saved else "no checkpoint was written"
    raise NonFiniteError(
        f"step {step}: non-finite {', '.join(names)} (NaN or inf); the step was not applied and "
        f"the run stopped ({kept} in {ckpt.directory}); lower config.learning_rate or check the "
        "data and loss settings"
    )
