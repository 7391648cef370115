"""A training run on disk: restore-or-init, warm start, the loop, evaluation and the outputs.

:func:`train_and_evaluate` is the library entry point of ``experiments/train.py``: it trains
(resuming from the workdir's checkpoints), evaluates on the validation split and writes the
run's results and figures. The numerics are the pure steps of :mod:`ccnn_jax.train`; this module
is the only one that reads and writes a run's files.

What a run guarantees about its workdir (see :func:`train`): the config is validated before
anything is touched; one process at a time holds the workdir; a rerun must use the config the
workdir was made with (``config.json``; :data:`ccnn_jax.configs.RERUN_MAY_DIFFER` may change);
a non-finite step is never applied or written, and stops the run; SIGTERM / SIGINT finish the
current step, save it and stop (:mod:`ccnn_jax.stops`). Either stop leaves the earlier
checkpoints and ``results.json`` as they were.
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
from ccnn_jax import configs, distributed, losses, metrics, pretrain, reporting, stops, train_log
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
    fresh state, replicated on the mesh. A fresh state loads the ImageNet weights of
    ``config.model.pretrained`` (:func:`ccnn_jax.train.load_pretrained`), then is warm-started
    from ``config.init_from`` when set, else from the (cached) pretrained network when
    ``config.pretrain.steps > 0`` (:func:`ccnn_jax.pretrain.ensure_pretrained`); none of these
    runs when there is a checkpoint to resume from.
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
    graphdef, state, _ = train_lib.create_train_state(
        config, num_classes, sharding=steps.replicated
    )
    state = train_lib.load_pretrained(config, graphdef, state)
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
    run must use the same model config (same variable shapes) and optimizer structure; it is
    opened read-only (nothing there is created, moved or cleaned up), and a missing or
    mismatched source raises :class:`ccnn_jax.configs.ConfigError` naming ``config.init_from``.
    """
    source = absolute(init_from)
    ckpt = checkpoint_lib.Checkpointer(source / "checkpoints", read_only=True)
    try:
        restored = ckpt.restore_latest(abstract, None)
    except checkpoint_lib.CheckpointError as e:
        raise configs.ConfigError(
            f"config.init_from: the checkpoint in {source} does not match this run's model "
            f"(same model and optimizer config expected): {e}"
        ) from None
    finally:
        ckpt.close()
    if restored is None:
        raise configs.ConfigError(
            f"config.init_from: no checkpoint under {source / 'checkpoints'} (expected the "
            "workdir of a finished or interrupted training run)"
        )
    source_state, source_meta = restored
    print(f"Warm start from {source} (step {source_meta['step']})", flush=True)
    return state.replace(params=source_state.params, batch_stats=source_state.batch_stats)


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

    Raises (each message names what to fix): :class:`ccnn_jax.configs.ConfigError` for an
    invalid field (before the workdir is touched); :class:`ccnn_jax.checkpoint.WorkdirError`
    when another process holds the workdir, the workdir was made with another config (see
    :func:`ccnn_jax.checkpoint.check_config_record`) or its checkpoints do not fit;
    ``stops.NonFiniteError`` when a step is non-finite (it is not applied and nothing after
    the previous checkpoint is written); ``stops.Interrupted`` after SIGTERM / SIGINT (the
    current step is checkpointed first).
    """
    workdir = _validated_workdir(config, workdir)
    with checkpoint_lib.workdir_lock(workdir):
        ckpt = checkpoint_lib.Checkpointer(
            workdir / "checkpoints", max_to_keep=config.max_checkpoints_to_keep
        )
        try:
            checkpoint_lib.check_config_record(
                workdir,
                config.to_dict(),
                may_differ=configs.RERUN_MAY_DIFFER,
                has_checkpoints=bool(ckpt.all_steps()),
            )
            return _train_in(config, workdir, ckpt, max_steps_this_run, progress)
        finally:
            ckpt.close()


def _validated_workdir(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> epath.Path:
    """``workdir`` made absolute, after :func:`ccnn_jax.configs.validate` passed on ``config``."""
    configs.validate(config, num_devices=jax.device_count())
    return absolute(workdir)


def _train_in(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    ckpt: checkpoint_lib.Checkpointer,
    max_steps_this_run: int | None,
    progress: bool,
) -> TrainOutput:
    """:func:`train` once the workdir is locked and its config record checked."""
    distributed.main_process_first(
        lambda: pipeline.prepare(
            config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir
        ),
        f"prepare {config.dataset} in {config.data_dir}",
    )
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
    state, resumed_from, seconds = restore_or_init(
        config, ckpt, data_iter, steps, abstract, meta.num_classes, progress=progress
    )
    start_step = int(jax.device_get(state.step))
    last_step = int(config.num_steps)
    if max_steps_this_run is not None:
        last_step = min(last_step, start_step + int(max_steps_this_run))
    log = train_log.TrainLog(workdir, config, start_step=start_step, progress=progress)
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
    return TrainOutput(graphdef, state, steps, spec, meta, seconds, resumed_from)


def _train_steps(
    state: train_lib.TrainState,
    steps: train_lib.Steps,
    data_iter: Any,
    ckpt: checkpoint_lib.Checkpointer,
    log: train_log.TrainLog,
    *,
    start_step: int,
    last_step: int,
    checkpoint_every: int,
    seconds: float,
) -> tuple[train_lib.TrainState, float]:
    """Steps ``start_step + 1 .. last_step``: train, log, checkpoint every ``checkpoint_every``
    steps (0: never) and at ``last_step``. Returns the state and the training seconds
    (``seconds`` before this call plus this call's, as recorded in the last checkpoint).

    The steps' ``nonfinite`` flags are read only where the loop synchronises anyway (a log
    window or a checkpoint); a non-finite step raises ``stops.NonFiniteError`` before
    anything of its window is written. A signal stops the loop after the current step, checkpointed.
    """
    seconds_before, t_start = seconds, time.time()
    with stops.StopOnSignal() as stop:
        for step in range(start_step + 1, last_step + 1):
            batch = steps.put_batch(next(data_iter))
            if step == start_step + 1:
                distributed.compile_together(steps.train, state, batch, name="train step")
            state, step_metrics = steps.train(state, batch)
            log.add(step, step_metrics)
            stopping = stop.signum is not None  # read once: a signal may arrive at any line
            end = step == last_step or stopping
            save = end or (checkpoint_every > 0 and step % checkpoint_every == 0)
            if save or step % log.every == 0:
                train_log.raise_if_nonfinite(log, ckpt)
            if end or step % log.every == 0:
                log.flush()
            if save:
                seconds = seconds_before + time.time() - t_start
                ckpt.save(step, state, data_iter, {"step": step, "seconds": seconds}, force=end)
            if stopping:
                raise stops.interrupted(stop.signum, step, ckpt)
    return state, seconds


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    out: TrainOutput, config: ml_collections.ConfigDict, *, split: str = "validation"
) -> tuple[np.ndarray, dict]:
    """Confusion matrix accumulated over ``split`` and its summary (mIoU, accuracy, per class)."""
    loader = _loader(config, split, batch_size=config.eval_batch_size, train=False, num_epochs=1)
    confusion = None
    for batch_np in distributed.lockstep(loader, pipeline.padding_like):
        batch = out.steps.put_batch(batch_np)
        if confusion is None:
            distributed.compile_together(out.steps.eval, out.state, batch, name="eval step")
        c = out.steps.eval(out.state, batch)
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
    batch = out.steps.put_batch(batch_np)
    distributed.compile_together(out.steps.predict, out.state, batch, name="predict step")
    pred = jax.device_get(out.steps.predict(out.state, batch))
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
    ``tensorboard/``, ``checkpoints/`` and ``config.json`` (the config the workdir was made
    with). Returns the results dict. Holds the workdir's lock until the outputs are written;
    raises as :func:`train` does, before any output is written.
    """
    workdir = _validated_workdir(config, workdir)
    with checkpoint_lib.workdir_lock(workdir):
        return _train_and_evaluate_in(config, workdir, max_steps_this_run, progress)


def _train_and_evaluate_in(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    max_steps_this_run: int | None,
    progress: bool,
) -> dict:
    """:func:`train_and_evaluate` once the workdir is locked."""
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
