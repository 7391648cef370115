r"""The two networks of the one-step demonstration, trained once and cached in the workdir.

Both are the same fully supervised run (same config, seed and data order): Q_full is trained for
``num_steps`` (:func:`train_full`), Q_under is stopped by an accuracy rule
(:func:`train_until_accuracy`): the first check at which its pixel accuracy on the first
validation images reaches a target. A rerun restores both from their checkpoints.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ccnn_jax import checkpoint as checkpoint_lib
from ccnn_jax import metrics, reporting
from ccnn_jax import run as run_lib
from ccnn_jax.models import upsample_logits


def eval_loader(train_config, split: str, *, batch_size: int):
    """One pass over ``split`` of the training config's dataset in evaluation mode."""
    from ccnn_jax.data import pipeline

    tc = train_config
    return pipeline.make_loader(
        tc.dataset,
        split,
        data_dir=tc.data_dir,
        batch_size=batch_size,
        image_size=tuple(tc.image_size),
        train=False,
        seed=int(tc.seed),
        num_epochs=1,
        shard_by_process=False,
    )


# ----------------------------------------------------------------------------- training (cached)


def _record(workdir: epath.Path, record: dict) -> dict:
    """The run record in ``workdir`` (written if absent). A rerun with another training config
    or stopping rule is an error rather than a silent mix of two runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    record = json.loads(json.dumps(record))  # tuples as lists, as the stored record has them
    path = workdir / "one_step_train.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if {k: stored.get(k) for k in record} != record:
            raise checkpoint_lib.WorkdirError(
                f"{path} records a different training config or stopping rule than the current "
                f"one; remove {workdir} to retrain (or use another --workdir)"
            )
        return stored
    reporting.write_json(path, record)
    return record


def _done_steps(workdir: epath.Path) -> int:
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints")
    try:
        return max(ckpt.all_steps(), default=0)
    finally:
        ckpt.close()


def train_full(train_config, workdir: epath.Path, *, progress: bool) -> run_lib.TrainOutput:
    """``run.train`` for ``train_config.num_steps`` in ``workdir``; a rerun restores it."""
    _record(workdir, {"train_config": train_config.to_dict()})
    return run_lib.train(train_config, workdir, progress=progress)


def _predict_fn(graphdef):
    """Jitted (params, batch_stats, images) -> log Q (B, H, W, K) at input resolution."""
    from flax import nnx

    @jax.jit
    def fn(params, batch_stats, images):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = upsample_logits(model(images, train=False), images.shape[1:3])
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    return fn


def log_probs_fn(out: run_lib.TrainOutput):
    """images (B, H, W, 3) -> log Q (B, H, W, K) of a trained network, eval mode."""
    fn, state = _predict_fn(out.graphdef), out.state
    return lambda images: fn(state.params, state.batch_stats, images)


def train_until_accuracy(
    train_config,
    workdir: epath.Path,
    *,
    target: float,
    check_every: int,
    check_images: int,
    progress: bool,
) -> tuple[run_lib.TrainOutput, list[list[float]]]:
    """Trains in chunks of ``check_every`` steps until the pixel accuracy on the first
    ``check_images`` validation images first reaches ``target`` (or ``num_steps`` is reached).

    A resumed run continues bit-identically (``run.train`` restores the data position), so the
    chunks change nothing but where the rule is checked. The checks are recorded in
    ``<workdir>/one_step_train.json``; a rerun of a stopped run restores its last checkpoint.
    Returns the trained run and the checks ``[[step, accuracy], ...]``.
    """
    rule = {"target": target, "check_every": check_every, "check_images": check_images}
    record = _record(workdir, {"train_config": train_config.to_dict(), "stopping_rule": rule})
    history = [list(h) for h in record.get("history", [])]
    if record.get("stopped_at") is not None:
        out = run_lib.train(train_config, workdir, max_steps_this_run=0, progress=False)
        if int(jax.device_get(out.state.step)) != record["stopped_at"]:
            raise RuntimeError(f"{workdir}: the checkpoint is not at the recorded stop")
        return out, history
    check = next(iter(eval_loader(train_config, "validation", batch_size=check_images)))
    images, predict, step = jnp.asarray(check["image"]), None, _done_steps(workdir)
    num_steps = int(train_config.num_steps)
    while True:
        chunk = min(check_every - step % check_every, num_steps - step)
        out = run_lib.train(train_config, workdir, max_steps_this_run=chunk, progress=False)
        step = int(jax.device_get(out.state.step))
        predict = predict or _predict_fn(out.graphdef)
        pred = jnp.argmax(predict(out.state.params, out.state.batch_stats, images), axis=-1)
        confusion = metrics.confusion_matrix(pred, jnp.asarray(check["mask"]), out.meta.num_classes)
        accuracy = metrics.pixel_accuracy(np.asarray(confusion))
        history.append([step, accuracy])
        if progress:
            print(f"under-trained network: step {step}, check accuracy {accuracy:.3f}", flush=True)
        stop = accuracy >= target or step >= num_steps
        record.update(history=history, stopped_at=step if stop else None)
        reporting.write_json(workdir / "one_step_train.json", record)
        if stop:
            return out, history
