"""A training run on disk: restore-or-init, warm start, the loop, evaluation and the outputs.

:func:`train_and_evaluate` is the library entry point of ``experiments/train.py``: it trains
(resuming from the workdir's checkpoints), evaluates on the validation split and writes the
run's results and figures. The numerics are the pure steps of :mod:`ccnn_jax.train`; this module
is the only one that reads and writes a run's files.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from ccnn_jax import checkpoint as checkpoint_lib
from ccnn_jax import configs, losses, metrics, pretrain, reporting
from ccnn_jax import train as train_lib
from ccnn_jax.data import pipeline

#: Training curves drawn in ``curves.png``.
CURVE_KEYS = (
    "train/loss",
    "train/miou",
    "train/pixel_accuracy",
    "train/solver_iterations",
    "train/solver_converged",
)


@dataclasses.dataclass
class TrainOutput:
    """A trained (or restored) run: ``model()`` gives the nnx model with the final weights."""

    graphdef: nnx.GraphDef
    state: train_lib.TrainState
    steps: train_lib.Steps
    spec: losses.LossSpec
    meta: Any
    seconds: float
    resumed_from: int | None

    def model(self) -> nnx.Module:
        return train_lib.merge_model(self.graphdef, jax.device_get(self.state))


def _check_config(config: ml_collections.ConfigDict) -> None:
    if config.method not in configs.METHODS:
        raise ValueError(f"config.method must be one of {configs.METHODS}, got {config.method!r}")
    for name in ("num_steps", "batch_size", "eval_batch_size"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    n = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % n:
            raise ValueError(f"config.{name} = {config[name]} must be divisible by the {n} devices")


def absolute(workdir: epath.PathLike) -> epath.Path:
    """orbax needs absolute checkpoint paths; local relative paths are resolved from the cwd."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _loader(config: ml_collections.ConfigDict, split: str, *, batch_size: int, **kwargs):
    """``pipeline.make_loader`` of ``config``'s dataset; ``batch_size`` is global (all hosts)."""
    return pipeline.make_loader(
        config.dataset,
        split,
        batch_size=batch_size // jax.process_count(),
        seed=config.seed,
        data_dir=config.data_dir,
        image_size=tuple(config.image_size),
        **kwargs,
    )


# ----------------------------------------------------------------------------- training


def restore_or_init(
    config: ml_collections.ConfigDict,
    ckpt: checkpoint_lib.Checkpointer,
    data_iter: Any,
    steps: train_lib.Steps,
    abstract: train_lib.TrainState,
    num_classes: int,
    *,
    progress: bool = True,
) -> tuple[train_lib.TrainState, int | None, float]:
    """The newest readable checkpoint in ``ckpt`` (state, and ``data_iter``'s position) or a
    fresh state, replicated on the mesh. A fresh state is warm-started from ``config.init_from``
    when set, else from the (cached) pretrained network when ``config.pretrain.steps > 0``
    (:func:`ccnn_jax.pretrain.ensure_pretrained`, run only when there is no checkpoint).
    ``abstract`` is the state's shape (``create_train_state(..., abstract=True)``).

    Returns ``(state, resumed_from, seconds)``: the restored step (None for a fresh state) and
    the training seconds accumulated before it.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=steps.replicated), abstract
    )
    restored = ckpt.restore_latest(abstract, data_iter)
    if restored is not None:
        state, ckpt_meta = restored
        resumed_from = int(ckpt_meta["step"])
        print(f"Resuming from checkpoint step {resumed_from} in {ckpt.directory}", flush=True)
        return steps.put_state(state), resumed_from, float(ckpt_meta["seconds"])
    _, state, _ = train_lib.create_train_state(config, num_classes)
    init_from = config.init_from
    if not init_from and config.pretrain.steps > 0:
        init_from = pretrain.ensure_pretrained(config, progress=progress)
    if init_from:
        state = warm_start(state, abstract, init_from)
    return steps.put_state(state), None, 0.0


def warm_start(
    state: train_lib.TrainState, abstract: train_lib.TrainState, init_from: epath.PathLike
) -> train_lib.TrainState:
    """``state`` with the model variables (params, batch_stats) of the newest checkpoint of the
    run in ``init_from`` (a workdir); step and optimizer state stay fresh.

    The fine-tuning analogue of the original CCNN starting from a pretrained network. The source
    run must use the same model config (same variable shapes) and optimizer structure.
    """
    source = absolute(init_from)
    ckpt = checkpoint_lib.Checkpointer(source / "checkpoints")
    try:
        restored = ckpt.restore_latest(abstract, None, read_only=True)
    except checkpoint_lib.CheckpointError as e:
        raise ValueError(
            f"config.init_from: the checkpoint in {source} does not match this run's model "
            f"(same model and optimizer config expected): {e}"
        ) from e
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(
            f"config.init_from: no checkpoint under {source / 'checkpoints'} (expected the "
            "workdir of a finished or interrupted training run)"
        )
    source_state, source_meta = restored
    print(f"Warm start from {source} (step {source_meta['step']})", flush=True)
    return state.replace(params=source_state.params, batch_stats=source_state.batch_stats)


class _TrainLog:
    """Window means of the step metrics every ``config.log_every`` steps (metrics.jsonl and
    TensorBoard, main process only) and a progress bar."""

    def __init__(self, workdir, config, *, start_step: int, progress: bool):
        is_main = jax.process_index() == 0
        self.writer = reporting.MetricWriter(workdir, resume_step=start_step, enabled=is_main)
        self.every = max(int(config.log_every), 1)
        self.pending: list[dict] = []
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

    def add(self, step: int, step_metrics: dict, *, last: bool) -> None:
        self.pending.append(step_metrics)
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every == 0 or last:
            row = _summarize_train(jax.device_get(self.pending), time.time() - self.t_window)
            self.pending, self.t_window = [], time.time()
            self.writer.write(step, row, prefix="train/")
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", miou=f"{row['miou']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def _summarize_train(rows: list[dict], seconds: float) -> dict[str, float]:
    """Window means of scalar metrics; mIoU / accuracy from the summed confusion matrices."""
    confusion = np.sum([r["confusion"] for r in rows], axis=0)
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "confusion"}
    if "solver_violation" in out:
        out["solver_violation"] = float(np.max([r["solver_violation"] for r in rows]))
    out["miou"] = metrics.mean_iou(confusion)
    out["pixel_accuracy"] = metrics.pixel_accuracy(confusion)
    out["steps_per_second"] = len(rows) / max(seconds, 1e-9)
    return out


def train(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    *,
    max_steps_this_run: int | None = None,
    progress: bool = True,
) -> TrainOutput:
    """Trains ``config`` in ``workdir`` for ``config.num_steps``, resuming from its checkpoints.

    A rerun with the same workdir restores the newest checkpoint (state, data-iterator position
    and accumulated time) and continues with the same batches, so an interrupted run ends with
    the same parameters as an uninterrupted one; a finished run returns at once.
    ``max_steps_this_run`` stops (after checkpointing) once that many steps ran in this call, as
    a preemption would.
    """
    _check_config(config)
    workdir = absolute(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pipeline.prepare(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)
    meta = pipeline.dataset_meta(config.dataset, data_dir=config.data_dir)
    spec = losses.loss_spec(config, meta)
    graphdef, abstract, tx = train_lib.create_train_state(config, meta.num_classes, abstract=True)
    steps = train_lib.make_steps(graphdef, tx, spec)
    loader = _loader(
        config,
        config.train_split,
        batch_size=config.batch_size,
        train=True,
        worker_count=config.worker_count,
        scale_range=tuple(config.scale_range),
    )
    data_iter = iter(loader)
    ckpt = checkpoint_lib.Checkpointer(
        workdir / "checkpoints", max_to_keep=config.max_checkpoints_to_keep
    )
    try:
        state, resumed_from, seconds = restore_or_init(
            config, ckpt, data_iter, steps, abstract, meta.num_classes, progress=progress
        )
        start_step = int(jax.device_get(state.step))
        last_step = int(config.num_steps)
        if max_steps_this_run is not None:
            last_step = min(last_step, start_step + int(max_steps_this_run))
        log = _TrainLog(workdir, config, start_step=start_step, progress=progress)
        try:
            state, seconds = _train_steps(
                state,
                steps,
                data_iter,
                ckpt,
                log,
                start_step=start_step,
                last_step=last_step,
                checkpoint_every=int(config.checkpoint_every),
                seconds=seconds,
            )
        finally:
            log.close()
    finally:
        ckpt.close()
    return TrainOutput(graphdef, state, steps, spec, meta, seconds, resumed_from)


def _train_steps(
    state: train_lib.TrainState,
    steps: train_lib.Steps,
    data_iter: Any,
    ckpt: checkpoint_lib.Checkpointer,
    log: _TrainLog,
    *,
    start_step: int,
    last_step: int,
    checkpoint_every: int,
    seconds: float,
) -> tuple[train_lib.TrainState, float]:
    """Steps ``start_step + 1 .. last_step``: train, log, checkpoint every ``checkpoint_every``
    steps (0: never) and at ``last_step``. Returns the state and the training seconds
    (``seconds`` before this call plus this call's, as recorded in the last checkpoint)."""
    seconds_before, t_start = seconds, time.time()
    for step in range(start_step + 1, last_step + 1):
        state, step_metrics = steps.train(state, steps.put_batch(next(data_iter)))
        last = step == last_step
        log.add(step, step_metrics, last=last)
        if (checkpoint_every > 0 and step % checkpoint_every == 0) or last:
            seconds = seconds_before + time.time() - t_start
            ckpt.save(step, state, data_iter, {"step": step, "seconds": seconds}, force=last)
    return state, seconds


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    out: TrainOutput, config: ml_collections.ConfigDict, *, split: str = "validation"
) -> tuple[np.ndarray, dict]:
    """Confusion matrix accumulated over ``split`` and its summary (mIoU, accuracy, per class)."""
    loader = _loader(config, split, batch_size=config.eval_batch_size, train=False, num_epochs=1)
    confusion = None
    for batch_np in loader:
        c = out.steps.eval(out.state, out.steps.put_batch(batch_np))
        confusion = c if confusion is None else confusion + c
    if confusion is None:
        raise ValueError(f"split {split!r} of {config.dataset!r} is empty")
    confusion = np.asarray(jax.device_get(confusion))
    return confusion, metrics.summarize(confusion, out.meta.class_names)


def _grid_batch(out: TrainOutput, config: ml_collections.ConfigDict, num: int) -> dict:
    """The first ``num`` validation images with ground truth, prediction and latent argmax."""
    loader = _loader(
        config,
        "validation",
        batch_size=config.eval_batch_size,
        train=False,
        num_epochs=1,
        shard_by_process=False,
    )
    batch_np = next(iter(loader))
    pred = jax.device_get(out.steps.predict(out.state, out.steps.put_batch(batch_np)))
    n = min(num, int(np.sum(batch_np["valid"])))
    return {
        "image": batch_np["image"][:n],
        "ground truth": batch_np["mask"][:n],
        "prediction": np.asarray(pred["pred"])[:n],
        "latent P argmax": np.asarray(pred["latent"])[:n],
    }


def write_outputs(workdir: epath.Path, results: dict, grid: dict) -> None:
    """``results.json``, ``results.md``, ``predictions.png`` (and its arrays,
    ``predictions.npz``) and ``curves.png`` in ``workdir``."""
    reporting.write_json(workdir / "results.json", results)
    reporting.write_npz(workdir / "predictions.npz", grid)
    columns = ["method", "dataset", "miou", "pixel_accuracy", "steps", "seconds"]
    (workdir / "results.md").write_text(
        reporting.markdown_table([results], columns) + "\n" + reporting.per_class_markdown(results)
    )
    title = f"{results['method']} on {results['dataset']}: val mIoU {results['miou']:.3f}"
    class_names = results["class_names"]
    reporting.save_grid(workdir / "predictions.png", grid, class_names=class_names, title=title)
    rows = reporting.read_metrics(workdir / "metrics.jsonl")
    reporting.save_curves(workdir / "curves.png", rows, list(CURVE_KEYS), title=title)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    *,
    max_steps_this_run: int | None = None,
    progress: bool = True,
) -> dict:
    """Trains (or resumes), evaluates on the validation split and writes the run's outputs.

    Writes to ``workdir``: ``results.json`` (method, dataset, miou, pixel_accuracy,
    per_class_iou, class_names, steps, seconds, ...), ``results.md``, ``predictions.png``
    (image | ground truth | prediction | latent P argmax), ``curves.png``, ``metrics.jsonl``,
    ``tensorboard/`` and ``checkpoints/``. Returns the results dict.
    """
    workdir = absolute(workdir)
    out = train(config, workdir, max_steps_this_run=max_steps_this_run, progress=progress)
    step = int(jax.device_get(out.state.step))
    t0 = time.time()
    confusion, summary = evaluate(out, config)
    eval_seconds = time.time() - t0
    results = {
        "method": config.method,
        "dataset": config.dataset,
        **summary,
        "class_names": list(out.meta.class_names),
        "steps": step,
        "num_steps": int(config.num_steps),
        "finished": step >= int(config.num_steps),
        "seconds": round(out.seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "resumed_from": out.resumed_from,
        "devices": jax.device_count(),
        "confusion": confusion.tolist(),
        **({"accuracy": summary["pixel_accuracy"]} if config.method == "pretrain" else {}),
        "config": config.to_dict(),
    }
    grid = _grid_batch(out, config, int(config.num_grid_images))
    if jax.process_index() == 0:
        write_outputs(workdir, results, grid)
        logging.info("results: %s", {k: results[k] for k in ("miou", "pixel_accuracy")})
    return results
