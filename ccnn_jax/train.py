r"""Pure training pieces: train state, optimizer, jitted train / eval / predict steps, mesh.

The train state is a pytree; :func:`train_step`, :func:`eval_step` and :func:`predict_step` are
pure functions of (state, batch), jitted by :func:`make_steps` with explicit shardings over a
``("data",)`` mesh of all devices: the batch is split along its leading axis, parameters are
replicated. The loss of each method is :func:`ccnn_jax.losses.compute_loss`; the run loop that
restores, trains, checkpoints and evaluates is :mod:`ccnn_jax.run`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ccnn_jax import losses, metrics
from ccnn_jax.losses import LossSpec, compute_loss
from ccnn_jax.models import UNet, upsample_logits

# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """step (); params / batch_stats (nnx.State of the model's Param / other variables);
    opt_state (optax)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def create_model(config: ml_collections.ConfigDict, num_classes: int, key: jax.Array | int) -> UNet:
    """The configured UNet; ``key`` seeds the parameter initialisation."""
    m = config.model
    return UNet(
        num_classes,
        width=m.width,
        depth=m.depth,
        norm=m.norm,
        output_stride=m.output_stride,
        classifier=m.classifier,
        rngs=nnx.Rngs(params=key),
    )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay over ``config.num_steps`` to
    ``final_lr_fraction * learning_rate``; gradients clipped to ``grad_clip_norm`` (0: off)."""
    warmup = min(config.warmup_steps, max(config.num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.num_steps, warmup + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    if config.grad_clip_norm:
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
        init_key, _ = jax.random.split(key)  # the second key is free for stochastic layers
        model = create_model(config, num_classes, init_key)
        _, params, batch_stats = nnx.split(model, nnx.Param, ...)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
        )

    abstract_model = nnx.eval_shape(lambda: create_model(config, num_classes, 0))
    graphdef = nnx.graphdef(abstract_model)
    return graphdef, (jax.eval_shape(init) if abstract else jax.jit(init)()), tx


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The nnx model holding ``state``'s parameters (call with ``train=False`` to predict)."""
    return nnx.merge(graphdef, state.params, state.batch_stats)


# ----------------------------------------------------------------------------- steps


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    spec: LossSpec,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; pure. Metrics: loss, grad_norm, train confusion (K, K), solver stats.

    For ``"pretrain"`` the network's image class scores (``model.classify``) are trained and the
    confusion is over images (:func:`classification_confusion`).
    """

    def loss_fn(params, batch_stats):
        # Fresh variables at this trace level, so BatchNorm may update its running averages.
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, batch_stats))
        if spec.method == "pretrain":
            outputs = model.classify(batch["image"], train=True)
        else:
            outputs = model(batch["image"], train=True)
        loss, aux = compute_loss(outputs, batch, spec, state.step)
        return loss, (aux, outputs, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (aux, outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if spec.method == "pretrain":
        confusion = classification_confusion(outputs, batch, spec)
    else:
        pred = jnp.argmax(upsample_logits(outputs, batch["mask"].shape[1:3]), axis=-1)
        confusion = metrics.confusion_matrix(pred, batch["mask"], spec.num_classes, batch["valid"])
    out = {"loss": loss, "grad_norm": optax.global_norm(grads), "confusion": confusion}
    out.update({k: v for k, v in aux.items() if k != "p"})
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, out


def classification_confusion(scores_BxK: jax.Array, batch: dict, spec: LossSpec) -> jax.Array:
    """Confusion (K, K) over images of the predicted object class (argmax of the object
    classes' scores) against the tagged one (the first tagged object class); images without
    an object tag are ignored."""
    is_object = losses.object_classes(spec.num_classes, spec.background)
    pred_B = jnp.argmax(jnp.where(is_object, scores_BxK, -jnp.inf), axis=-1)
    tagged_B = jnp.where(is_object, batch["tags"], 0.0)
    true_B = jnp.argmax(tagged_B, axis=-1)
    valid_B = batch["valid"] * (jnp.max(tagged_B, axis=-1) > 0)
    as_pixels = lambda x: x[:, None, None]  # noqa: E731
    return metrics.confusion_matrix(as_pixels(pred_B), as_pixels(true_B), spec.num_classes, valid_B)


def eval_step(
    state: TrainState, batch: dict, *, graphdef: nnx.GraphDef, spec: LossSpec
) -> jax.Array:
    """Confusion matrix (K, K) of argmax predictions at mask resolution (padding ignored); for
    ``"pretrain"`` of image classes (:func:`classification_confusion`)."""
    model = merge_model(graphdef, state)
    if spec.method == "pretrain":
        return classification_confusion(model.classify(batch["image"]), batch, spec)
    num_classes = spec.num_classes
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
    model = merge_model(graphdef, state)
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
    """The jitted steps with their shardings (batch split over "data", state replicated).

    ``train(state, batch) -> (state, metrics)``, ``eval(state, batch) -> confusion (K, K)``,
    ``predict(state, batch) -> {"pred", "latent"}``.
    """

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
    """:func:`train_step` (state donated), :func:`eval_step` and :func:`predict_step`, jitted
    on ``mesh`` (default :func:`make_mesh`): batch split over "data", state replicated."""
    mesh = mesh or make_mesh()
    data = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    train_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, spec=spec),
        in_shardings=(repl, data),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, spec=spec),
        in_shardings=(repl, data),
        out_shardings=repl,
    )
    predict_fn = jax.jit(
        functools.partial(predict_step, graphdef=graphdef, spec=spec),
        in_shardings=(repl, data),
        out_shardings=data,
    )
    return Steps(mesh=mesh, train=train_fn, eval=eval_fn, predict=predict_fn)


def maybe_initialize_distributed(force: bool = False) -> None:
    """``jax.distributed.initialize()`` for multi-host launches (before any other JAX call).

    Runs when ``force`` or when a coordinator is configured through the environment
    (``JAX_COORDINATOR_ADDRESS``); on Cloud TPU / SLURM / Open MPI, ``initialize()`` detects
    the cluster itself, so pass ``force=True`` (``experiments/train.py --multihost``).
    """
    if force or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
