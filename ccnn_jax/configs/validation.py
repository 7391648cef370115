"""Validation of a training config: every field a run reads, checked before anything runs.

:func:`validate` raises :class:`ConfigError` with one line that names the field and its allowed
range, e.g. ``config.solver.max_iter must be an integer >= 1, got 0``. It checks the fields of
:func:`ccnn_jax.configs.base` (absent model fields are skipped, so other model families can
drop them) and leaves sections it does not know alone: unknown *fields* are refused by
ml_collections itself (a locked ``ConfigDict``), not by a whitelist here.

:data:`RERUN_MAY_DIFFER` lists the fields a rerun in an existing workdir may change (see
:func:`ccnn_jax.checkpoint.check_config_record`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import ml_collections

#: Fields a rerun in an existing workdir may change; any other difference from the workdir's
#: recorded config is refused. ``num_steps`` extends (or shortens) a run: the learning-rate
#: schedule is recomputed for the new length, so an extended run is not identical to one
#: started with that many steps. ``init_from`` and ``pretrain.workdir`` are paths to the run's
#: starting point, read only when the workdir has no checkpoint (a rerun resumes its checkpoint
#: whatever they say; pretraining resumes its stages without them). The others change only
#: logging, checkpoint cadence, figures, evaluation batching or where the data lives, never the
#: trained weights. Not here: ``worker_count`` (grain's saved iterator position is tied to it
#: and refuses another count) and everything numeric about the model, data, optimizer, loss,
#: solver and pretraining.
RERUN_MAY_DIFFER = (
    "num_steps",
    "log_every",
    "checkpoint_every",
    "max_checkpoints_to_keep",
    "num_grid_images",
    "eval_batch_size",
    "data_dir",
    "manual_dir",
    "init_from",
    "pretrain.workdir",
)

_SOLVER_METHODS = ("newton", "pga")


class ConfigError(ValueError):
    """A config field has a value outside its allowed range (the message names the field)."""


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Raises :class:`ConfigError` naming the first invalid field of a training ``config``.

    ``num_devices``: when given, the batch sizes must be divisible by it.
    """
    _check_choices(config)
    _check_counts(config)
    _check_optimizer(config)
    _check_solver_and_loss(config)
    _check_constraints(config)
    _check_paths(config)
    _check_model_and_images(config)
    _check_backbone(config)
    _check_pretrain(config)
    if num_devices is not None:
        _check_divisible(config, ("batch_size", "eval_batch_size"), num_devices)
        if _pretrains(config):
            _check_divisible(config, ("pretrain.batch_size",), num_devices)
    _check_split(config)
    _check_dataset(config, "dataset")
    if _pretrains(config):
        _check_dataset(config, "pretrain.dataset")
        if _get(config, "pretrain.easy_steps") > 0:
            _check_dataset(config, "pretrain.easy_dataset")


# ----------------------------------------------------------------------------- field groups


def _check_choices(config) -> None:
    from ccnn_jax import configs

    _one_of(config, "method", configs.METHODS)
    _one_of(config, "solver.method", _SOLVER_METHODS)


def _check_counts(config) -> None:
    for name in ("num_steps", "batch_size", "eval_batch_size", "log_every"):
        _integer(config, name, 1)
    _integer(config, "max_checkpoints_to_keep", 1)
    for name in ("warmup_steps", "checkpoint_every", "num_grid_images", "worker_count", "seed"):
        _integer(config, name, 0)
    _integer(config, "mil_warmup_steps", 0)


def _check_optimizer(config) -> None:
    _number(config, "learning_rate", low=0.0, note=" (0: the weights stay as loaded)")
    _number(config, "weight_decay", low=0.0)
    _number(config, "grad_clip_norm", low=0.0, note=" (0: no clipping)")
    _number(config, "final_lr_fraction", low=0.0, high=1.0)


def _check_solver_and_loss(config) -> None:
    _number(config, "solver.tol", low=0.0, low_open=True)
    _integer(config, "solver.max_iter", 1)
    if _get(config, "hardness") is not None:
        _number(config, "hardness", low=0.0, low_open=True, note=" or None")
    _number(config, "mil_weight", low=0.0)


def _check_constraints(config) -> None:
    import dataclasses

    from ccnn_jax import constraints

    known = [f.name for f in dataclasses.fields(constraints.TagBounds)]
    unknown = sorted(set(_get(config, "constraints").keys()) - set(known))
    if unknown:
        raise ConfigError(f"config.constraints has unknown bounds {unknown} (known: {known})")
    for name in known:
        if name == "fg_slack":
            _number(config, "constraints.fg_slack", low=0.0, allow_inf=True, note=" (inf: hard)")
        else:
            _number(config, f"constraints.{name}", low=0.0, high=1.0, note=" (image fraction)")
    _ordered(config, "constraints.bg_lower", "constraints.bg_upper")
    _ordered(config, "constraints.size_bg_lower", "constraints.size_bg_upper")


def _check_paths(config) -> None:
    _check_paths_named(config, ("data_dir", "manual_dir", "init_from", "pretrain.workdir"))


def _check_paths_named(config, names: Iterable[str]) -> None:
    for name in names:
        value = _get(config, name)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise ConfigError(f"config.{name} must be None or a non-empty path, got {value!r}")


def _check_model_and_images(config) -> None:
    from ccnn_jax.models.unet import NORMS

    model = _get(config, "model")
    for name in ("width", "depth"):
        if name in model:
            _integer(config, f"model.{name}", 1 if name == "width" else 0)
    if "norm" in model:
        _one_of(config, "model.norm", NORMS)
    depth = model.get("depth")
    if "output_stride" in model and depth is not None:
        stride = _get(config, "model.output_stride")
        powers = [2**k for k in range(depth + 1)]
        if stride not in powers or isinstance(stride, bool):
            _fail("model.output_stride", f"one of {powers} (a power of two <= 2**depth)", stride)
    if "classifier" in model:
        _boolean(config, "model.classifier")
        if _get(config, "method") == "pretrain" and not model.classifier:
            _fail(
                "model.classifier", "True for method 'pretrain' (it trains the classifier)", False
            )
    _check_image_size(config, "image_size", 2**depth if depth is not None else 1)
    _check_scale_range(config, "scale_range")


def _check_backbone(config) -> None:
    """``model.name`` and the backbone fields, ``dtype``, and the optimizer choice."""
    from ccnn_jax.models import MODELS

    model = _get(config, "model")
    if "name" in model:
        _one_of(config, "model.name", sorted(MODELS))
        if model.name == "unet" and model.get("pretrained"):
            _fail(
                "model.pretrained",
                "None for the UNet (ImageNet weights exist for the backbones)",
                model.pretrained,
            )
        if model.name != "unet" and _pretrains(config):
            _fail(
                "pretrain.steps",
                f"0 for {model.name!r} (it starts from model.pretrained)",
                _get(config, "pretrain.steps"),
            )
    if model.get("pretrained") is not None:
        _check_paths_named(config, ("model.pretrained",))
    if "pretrained_layout" in model:
        _one_of(config, "model.pretrained_layout", ("torchvision", "timm"))
    for name in ("backbone_width", "fc_features"):
        if model.get(name) is not None:
            _integer(config, f"model.{name}", 1)
    if "dropout_rate" in model:
        _number(config, "model.dropout_rate", low=0.0, high=1.0)
    if "dtype" in config:
        _one_of(config, "dtype", ("float32", "bfloat16"))
    if "optimizer" in config:
        _one_of(config, "optimizer", ("adamw", "sgd"))
    if "momentum" in config:
        _number(config, "momentum", low=0.0, high=1.0)
    if "lr_decay_steps" in config:
        _integer(config, "lr_decay_steps", 1)
    if "lr_decay_factor" in config:
        _number(config, "lr_decay_factor", low=0.0, high=1.0, low_open=True)


def _pretrains(config) -> bool:
    """Whether a fresh run of ``config`` pretrains (``pretrain.steps > 0`` and no init_from)."""
    return _get(config, "pretrain.steps") > 0 and not _get(config, "init_from")


def _check_pretrain(config) -> None:
    for name in ("steps", "easy_steps", "warmup_steps"):
        _integer(config, f"pretrain.{name}", 0)
    _integer(config, "pretrain.batch_size", 1)
    _number(config, "pretrain.learning_rate", low=0.0, low_open=True)
    for name in ("dataset", "easy_dataset"):
        value = _get(config, f"pretrain.{name}")
        if not (isinstance(value, str) and value.strip()):
            _fail(f"pretrain.{name}", "a registered dataset[/config] name", value)
    depth = _get(config, "model").get("depth")
    _check_image_size(config, "pretrain.image_size", 2**depth if depth is not None else 1)
    _check_scale_range(config, "pretrain.scale_range")
    model = _get(config, "model")
    if _pretrains(config) and "classifier" in model and not model.classifier:
        raise ConfigError(
            "config.model.classifier must be True when config.pretrain.steps > 0 (pretraining "
            "trains the classifier), got False; set it or --config.pretrain.steps=0"
        )


def _check_image_size(config, name: str, multiple: int) -> None:
    size = _get(config, name)
    ok = isinstance(size, tuple | list) and len(size) == 2
    ok = ok and all(_is_int(s) and s >= 1 and s % multiple == 0 for s in size)
    if not ok:
        _fail(name, f"(height, width), positive multiples of {multiple} (2**depth)", size)


def _check_scale_range(config, name: str) -> None:
    value = _get(config, name)
    ok = isinstance(value, tuple | list) and len(value) == 2
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ok = ok and all(math.isfinite(v) and v > 0 for v in value) and value[0] <= value[1]
    if not ok:
        _fail(name, "(low, high) rescale factors with 0 < low <= high", value)


def _check_divisible(config, names: Iterable[str], num_devices: int) -> None:
    for name in names:
        if _get(config, name) % num_devices:
            _fail(name, f"divisible by the {num_devices} devices", _get(config, name))


def _check_split(config) -> None:
    import tensorflow_datasets as tfds

    split = _get(config, "train_split")
    try:
        if not isinstance(split, str):
            raise TypeError(split)
        tfds.core.ReadInstruction.from_spec(split)
    except (ValueError, TypeError, AttributeError):
        _fail("train_split", "a TFDS split such as 'train' or 'train[:10%]'", split)


def _check_dataset(config, field: str) -> None:
    import tensorflow_datasets as tfds

    from ccnn_jax.data import pipeline

    name = _get(config, field)
    rule = f"a registered dataset[/config], e.g. one of {pipeline.known_datasets()}"
    if not isinstance(name, str) or not name.strip():
        _fail(field, rule, name)
    base, _, builder_config = name.partition(":")[0].partition("/")
    try:
        cls = tfds.builder_cls(base)
    except tfds.core.registered.DatasetNotFoundError:
        _fail(field, rule, name)
    if builder_config and builder_config not in (cls.builder_configs or {}):
        _fail(field, f"'{base}/<config>' with a config in {list(cls.builder_configs)}", name)


# ----------------------------------------------------------------------------- rules


def _get(config, name: str) -> Any:
    """The value of a dotted field name; ConfigError if the config lacks it."""
    node = config
    for part in name.split("."):
        if part not in node:
            raise ConfigError(f"config.{name} is missing (see ccnn_jax.configs.base())")
        node = node[part]
    return node


def _fail(name: str, rule: str, value: Any) -> None:
    raise ConfigError(f"config.{name} must be {rule}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(config, name: str, low: int) -> None:
    value = _get(config, name)
    if not (_is_int(value) and value >= low):
        _fail(name, f"an integer >= {low}", value)


def _number(
    config,
    name: str,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    allow_inf: bool = False,
    note: str = "",
) -> None:
    """A real number in ``[low, high]`` (``(low, high]`` with ``low_open``); NaN never passes."""
    value = _get(config, name)
    real = isinstance(value, int | float) and not isinstance(value, bool)
    ok = real and not math.isnan(value) and (allow_inf or math.isfinite(value))
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        rng = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'}]"
        kind = "a number" if allow_inf else "a finite number"
        _fail(name, f"{kind} in {rng}{note}", value)


def _boolean(config, name: str) -> None:
    value = _get(config, name)
    if not isinstance(value, bool):
        _fail(name, "True or False", value)


def _one_of(config, name: str, choices: Iterable[str]) -> None:
    value = _get(config, name)
    if value not in tuple(choices):
        _fail(name, f"one of {tuple(choices)}", value)


def _ordered(config, lower: str, upper: str) -> None:
    if _get(config, lower) > _get(config, upper):
        raise ConfigError(
            f"config.{lower} must be <= config.{upper}, got {_get(config, lower)!r} > "
            f"{_get(config, upper)!r}"
        )
