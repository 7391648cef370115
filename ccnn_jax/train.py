r"""Training and evaluation: pure jitted steps, a 1-D data-parallel mesh, orbax resume.

Methods (``config.method``):

- ``"ccnn"``: CCNN from tags — per image, P = argmin KL(P || Q) under the tag constraints,
  solved inside the step on stop_gradient(log Q); loss = CE(P, Q) (:func:`losses.ccnn_loss`).
- ``"ccnn_size"``: the same with the 1-bit size hints (hardness ``SIZE_HARDNESS``).
- ``"mil"``: MIL-FCN, sigmoid CE of max-pooled class scores against tags.
- ``"full"``: pixel-wise CE against the masks (the fully supervised upper bound).

The train state is a pytree; :func:`train_step` and :func:`eval_step` are pure functions of
(state, batch), jitted where they are called with explicit shardings over a ``("data",)`` mesh of
all devices: the batch is split along its leading axis, parameters are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ccnn_jax import checkpoint as checkpoint_lib
from ccnn_jax import configs, losses, metrics, reporting
from ccnn_jax.models import UNet, upsample_logits

METHODS = configs.METHODS


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """step (); params / batch_stats (nnx.State of the model's Param / other variables);
    opt_state (optax); rng (2,) uint32 key data (for stochastic layers; folded with step)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def create_model(config: ml_collections.ConfigDict, num_classes: int, key: jax.Array | int) -> UNet:
    """The configured UNet; ``key`` seeds the parameter initialisation."""
    m = config.model
    return UNet(
        num_classes,
        width=m.width,
        depth=m.depth,
        norm=m.norm,
        output_stride=m.get("output_stride", 1),
        rngs=nnx.Rngs(params=key),
    )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay over ``config.num_steps``."""
    warmup = min(config.warmup_steps, max(config.num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.num_steps, warmup + 1),
        end_value=config.learning_rate * config.get("final_lr_fraction", 0.01),
    )
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    if config.get("grad_clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


def create_train_state(
    config: ml_collections.ConfigDict, num_classes: int, *, abstract: bool = False
) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """(graphdef, state, tx) for a freshly initialised model (deterministic from config.seed).

    Initialisation runs as one jitted program with "rbg" keys: eager threefry initialisation
    compiles every initializer separately and takes minutes on a small CPU. ``abstract=True``
    returns the state's shapes only (``jax.ShapeDtypeStruct`` leaves), e.g. to restore into.
    """
    tx = make_optimizer(config)

    def init():
        key = jax.random.key(config.seed, impl="rbg")
        init_key, state_key = jax.random.split(key)
        model = create_model(config, num_classes, init_key)
        _, params, batch_stats = nnx.split(model, nnx.Param, ...)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            rng=jax.random.key_data(state_key),
        )

    abstract_model = nnx.eval_shape(lambda: create_model(config, num_classes, 0))
    graphdef = nnx.graphdef(abstract_model)
    return graphdef, (jax.eval_shape(init) if abstract else jax.jit(init)()), tx


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The nnx model holding ``state``'s parameters (call with ``train=False`` to predict)."""
    return nnx.merge(graphdef, state.params, state.batch_stats)


# ----------------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static loss settings (hashable so steps can close over them)."""

    method: str
    background: int | None
    num_classes: int
    solver_method: str = "newton"
    solver_tol: float = 1e-4
    solver_max_iter: int = 50
    mil_warmup_steps: int = 0
    mil_weight: float = 0.0
    constraints: tuple[tuple[str, float], ...] = ()  # from_tags bounds, as sorted items
    hardness: float | None = None  # solver inverse temperature; None: 1 (tags), 1000 (sizes)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


def loss_spec(config: ml_collections.ConfigDict, meta) -> LossSpec:
    s = config.solver
    return LossSpec(
        method=config.method,
        background=meta.background,
        num_classes=meta.num_classes,
        solver_method=s.method,
        solver_tol=float(s.tol),
        solver_max_iter=int(s.max_iter),
        mil_warmup_steps=int(config.get("mil_warmup_steps", 0)),
        mil_weight=float(config.get("mil_weight", 0.0)),
        constraints=tuple(sorted((k, float(v)) for k, v in config.get("constraints", {}).items())),
        hardness=None if config.get("hardness") is None else float(config.hardness),
    )


def compute_loss(
    logits_BxhxwxK: jax.Array, batch: dict, spec: LossSpec, step: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The configured method's loss on (possibly coarse) logits; aux has scalars (+ ``p``)."""
    valid = batch["valid"]
    if spec.method in ("ccnn", "ccnn_size") and (spec.mil_warmup_steps or spec.mil_weight):
        loss, aux = compute_loss(
            logits_BxhxwxK, batch, dataclasses.replace(spec, mil_warmup_steps=0, mil_weight=0.0)
        )
        mil, _ = losses.mil_loss(logits_BxhxwxK, batch["tags"], valid)
        aux["ccnn_loss"], aux["mil_loss"] = loss, mil
        loss = loss + spec.mil_weight * mil
        if step is not None and spec.mil_warmup_steps:
            loss = jnp.where(step < spec.mil_warmup_steps, mil, loss)
        return loss, aux
    if spec.method in ("ccnn", "ccnn_size"):
        return losses.ccnn_loss(
            logits_BxhxwxK,
            batch["tags"],
            valid,
            size_BxK=batch["size"] if spec.method == "ccnn_size" else None,
            background=spec.background,
            method=spec.solver_method,
            hardness=spec.hardness,
            solver_kwargs={"tol": spec.solver_tol, "max_iter": spec.solver_max_iter},
            constraint_kwargs=dict(spec.constraints),
        )
    if spec.method == "mil":
        return losses.mil_loss(logits_BxhxwxK, batch["tags"], valid)
    logits = upsample_logits(logits_BxhxwxK, batch["mask"].shape[1:3])
    return losses.supervised_loss(logits, batch["mask"], valid)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    spec: LossSpec,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; pure. Metrics: loss, grad_norm, train confusion (K, K), solver stats."""

    def loss_fn(params, batch_stats):
        # Fresh variables at this trace level, so BatchNorm may update its running averages.
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, batch_stats))
        logits = model(batch["image"], train=True)
        loss, aux = compute_loss(logits, batch, spec, state.step)
        return loss, (aux, logits, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (aux, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    pred = jnp.argmax(upsample_logits(logits, batch["mask"].shape[1:3]), axis=-1)
    out = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "confusion": metrics.confusion_matrix(
            pred, batch["mask"], spec.num_classes, batch["valid"]
        ),
    }
    out.update({k: v for k, v in aux.items() if k != "p"})
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, out


def eval_step(
    state: TrainState, batch: dict, *, graphdef: nnx.GraphDef, num_classes: int
) -> jax.Array:
    """Confusion matrix (K, K) of argmax predictions at mask resolution (padding ignored)."""
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    logits = upsample_logits(model(batch["image"], train=False), batch["mask"].shape[1:3])
    pred = jnp.argmax(logits, axis=-1)
    return metrics.confusion_matrix(pred, batch["mask"], num_classes, batch["valid"])


def predict_step(
    state: TrainState, batch: dict, *, graphdef: nnx.GraphDef, spec: LossSpec
) -> dict[str, jax.Array]:
    """Predictions for figures: ``pred`` argmax Q and ``latent`` argmax P (at mask resolution).

    P is solved from the batch's tags (and size hints for ``ccnn_size``) for every method, so
    the baselines' figures show what the CCNN constraints would make of their output.
    """
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    logits = model(batch["image"], train=False)
    ccnn_spec = dataclasses.replace(
        spec, method="ccnn_size" if spec.method == "ccnn_size" else "ccnn"
    )
    _, aux = compute_loss(logits, batch, ccnn_spec)
    size = batch["mask"].shape[1:3]
    return {
        "pred": jnp.argmax(upsample_logits(logits, size), axis=-1),
        "latent": jnp.argmax(upsample_logits(aux["p"], size), axis=-1),
    }


# ----------------------------------------------------------------------------- sharding


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D ``("data",)`` mesh over all devices (all processes); GSPMD (Auto) axis type."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@dataclasses.dataclass
class Steps:
    """The jitted steps with their shardings (batch split over "data", state replicated)."""

    mesh: jax.sharding.Mesh
    train: Any
    eval: Any
    predict: Any

    @property
    def data_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def put_batch(self, batch_np: dict) -> dict:
        """Process-local numpy batch -> global arrays sharded along the batch axis."""
        sharding = self.data_sharding
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch_np.items()
        }

    def put_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.replicated)


def make_steps(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    spec: LossSpec,
    mesh: jax.sharding.Mesh | None = None,
) -> Steps:
    mesh = mesh or make_mesh()
    data = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    train = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, spec=spec),
        in_shardings=(repl, data),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, num_classes=spec.num_classes),
        in_shardings=(repl, data),
        out_shardings=repl,
    )
    predict = jax.jit(
        functools.partial(predict_step, graphdef=graphdef, spec=spec),
        in_shardings=(repl, data),
        out_shardings=data,
    )
    return Steps(mesh=mesh, train=train, eval=evaluate, predict=predict)


def maybe_initialize_distributed(force: bool = False) -> None:
    """``jax.distributed.initialize()`` for multi-host launches (before any other JAX call).

    Runs when ``force`` or when a coordinator is configured through the environment
    (``JAX_COORDINATOR_ADDRESS``); on Cloud TPU / SLURM / Open MPI, ``initialize()`` detects
    the cluster itself, so pass ``force=True`` (``experiments/train.py --multihost``).
    """
    if force or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


# ----------------------------------------------------------------------------- training loop


@dataclasses.dataclass
class TrainOutput:
    """A trained (or restored) run: ``model()`` gives the nnx model with the final weights."""

    graphdef: nnx.GraphDef
    state: TrainState
    steps: Steps
    spec: LossSpec
    meta: Any
    seconds: float
    resumed_from: int | None

    def model(self) -> nnx.Module:
        return merge_model(self.graphdef, jax.device_get(self.state))


def _check_config(config: ml_collections.ConfigDict) -> None:
    if config.method not in METHODS:
        raise ValueError(f"config.method must be one of {METHODS}, got {config.method!r}")
    for name in ("num_steps", "batch_size", "eval_batch_size"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    n = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % n:
            raise ValueError(f"config.{name} = {config[name]} must be divisible by the {n} devices")


def _absolute(workdir: epath.PathLike) -> epath.Path:
    """orbax needs absolute checkpoint paths; local relative paths are resolved from the cwd."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _data_kwargs(config) -> dict:
    return {"data_dir": config.get("data_dir"), "image_size": tuple(config.image_size)}


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
    from ccnn_jax.data import pipeline  # registers the builders

    _check_config(config)
    workdir = _absolute(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pipeline.prepare(config.dataset, data_dir=config.get("data_dir"),
                     manual_dir=config.get("manual_dir"))  # fmt: skip
    meta = pipeline.dataset_meta(config.dataset, data_dir=config.get("data_dir"))
    spec = loss_spec(config, meta)
    graphdef, abstract, tx = create_train_state(config, meta.num_classes, abstract=True)
    steps = make_steps(graphdef, tx, spec)

    per_process_batch = config.batch_size // jax.process_count()
    loader = pipeline.make_loader(
        config.dataset, config.get("train_split", "train"), batch_size=per_process_batch,
        train=True, seed=config.seed,
        worker_count=config.get("worker_count", 0), **_data_kwargs(config),
    )  # fmt: skip
    data_iter = iter(loader)
    ckpt = checkpoint_lib.Checkpointer(
        workdir / "checkpoints", max_to_keep=config.get("max_checkpoints_to_keep", 3)
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=steps.replicated), abstract
    )
    restored = ckpt.restore_latest(abstract, data_iter)
    seconds_before = 0.0
    resumed_from = None
    if restored is not None:
        state, ckpt_meta = restored
        resumed_from = int(ckpt_meta["step"])
        seconds_before = float(ckpt_meta.get("seconds", 0.0))
        print(f"Resuming from checkpoint step {resumed_from} in {ckpt.directory}", flush=True)
    else:
        state = create_train_state(config, meta.num_classes)[1]
        if config.get("init_from"):
            state = warm_start(state, abstract, config.init_from)
    state = steps.put_state(state)
    start_step = int(jax.device_get(state.step))
    num_steps = int(config.num_steps)
    last_step = num_steps
    if max_steps_this_run is not None:
        last_step = min(num_steps, start_step + int(max_steps_this_run))

    is_main = jax.process_index() == 0
    writer = reporting.MetricWriter(workdir, resume_step=start_step, enabled=is_main)
    t_start = time.time()
    log_every = max(int(config.log_every), 1)
    ckpt_every = int(config.checkpoint_every)
    pending: list[dict] = []
    saved_seconds = {start_step: seconds_before} if restored is not None else {}
    bar = None
    if progress and is_main and start_step < num_steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start_step, desc=f"train {config.method}",
                   dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    t_log = time.time()
    step = start_step
    try:
        while step < last_step:
            batch = steps.put_batch(next(data_iter))
            state, step_metrics = steps.train(state, batch)
            step += 1
            pending.append(step_metrics)
            if bar is not None:
                bar.update(1)
            if step % log_every == 0 or step == last_step:
                row = _summarize_train(jax.device_get(pending), time.time() - t_log)
                pending, t_log = [], time.time()
                writer.write(step, row, prefix="train/")
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", miou=f"{row['miou']:.3f}")
            if (ckpt_every > 0 and step % ckpt_every == 0) or step == last_step:
                seconds = seconds_before + time.time() - t_start
                ckpt.save(step, state, data_iter, {"step": step, "seconds": seconds},
                          force=step == last_step)  # fmt: skip
                saved_seconds[step] = seconds
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    seconds = seconds_before + (time.time() - t_start if start_step < last_step else 0.0)
    seconds = saved_seconds.get(step, seconds)
    return TrainOutput(graphdef, state, steps, spec, meta, seconds, resumed_from)


def warm_start(state: TrainState, abstract: TrainState, init_from: epath.PathLike) -> TrainState:
    """``state`` with the model variables (params, batch_stats) of the newest checkpoint of the
    run in ``init_from`` (a workdir); step, optimizer state and RNG stay fresh.

    The fine-tuning analogue of the original CCNN starting from a pretrained network. The source
    run must use the same model config (same variable shapes) and optimizer structure.
    """
    source = _absolute(init_from)
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


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    out: TrainOutput, config: ml_collections.ConfigDict, *, split: str = "validation"
) -> tuple[np.ndarray, dict]:
    """Confusion matrix accumulated over ``split`` and its summary (mIoU, accuracy, per class)."""
    from ccnn_jax.data import pipeline

    loader = pipeline.make_loader(
        config.dataset, split, batch_size=config.eval_batch_size // jax.process_count(),
        train=False, seed=config.seed, num_epochs=1, **_data_kwargs(config),
    )  # fmt: skip
    confusion = None
    for batch_np in loader:
        c = out.steps.eval(out.state, out.steps.put_batch(batch_np))
        confusion = c if confusion is None else confusion + c
    if confusion is None:
        raise ValueError(f"split {split!r} of {config.dataset!r} is empty")
    confusion = np.asarray(jax.device_get(confusion))
    return confusion, metrics.summarize(confusion, out.meta.class_names)


def _grid_batch(out: TrainOutput, config, num: int) -> dict:
    from ccnn_jax.data import pipeline

    loader = pipeline.make_loader(
        config.dataset, "validation", batch_size=config.eval_batch_size // jax.process_count(),
        train=False, seed=config.seed, num_epochs=1, shard_by_process=False,
        **_data_kwargs(config),
    )  # fmt: skip
    batch_np = next(iter(loader))
    pred = jax.device_get(out.steps.predict(out.state, out.steps.put_batch(batch_np)))
    n = min(num, int(np.sum(batch_np["valid"])))
    return {
        "image": batch_np["image"][:n],
        "ground truth": batch_np["mask"][:n],
        "prediction": np.asarray(pred["pred"])[:n],
        "latent P argmax": np.asarray(pred["latent"])[:n],
    }


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
    workdir = _absolute(workdir)
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
        "config": config.to_dict(),
    }
    is_main = jax.process_index() == 0
    grid = _grid_batch(out, config, int(config.get("num_grid_images", 8)))
    if is_main:
        reporting.write_json(workdir / "results.json", results)
        (workdir / "results.md").write_text(
            reporting.markdown_table([results], ["method", "dataset", "miou", "pixel_accuracy",
                                                 "steps", "seconds"])
            + "\n" + reporting.per_class_markdown(results)
        )  # fmt: skip
        title = f"{config.method} on {config.dataset}: val mIoU {summary['miou']:.3f}"
        reporting.save_grid(workdir / "predictions.png", grid,
                            class_names=out.meta.class_names, title=title)  # fmt: skip
        rows = reporting.read_metrics(workdir / "metrics.jsonl")
        keys = ["train/loss", "train/miou", "train/pixel_accuracy", "train/solver_iterations",
                "train/solver_converged"]  # fmt: skip
        reporting.save_curves(workdir / "curves.png", rows, keys, title=title)
        logging.info("results: %s", {k: results[k] for k in ("miou", "pixel_accuracy")})
    return results
