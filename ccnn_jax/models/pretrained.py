"""ImageNet weights from a ``.safetensors`` file (torchvision / timm key layout) into a backbone.

The file is read with the ``safetensors`` numpy API (no torch). Every tensor is mapped by name
to one model variable through a :class:`TensorSpec` (target path, expected file shape, numpy
converter); all shapes are checked before anything is written, and a mismatch raises ONE
``ValueError`` naming the file and listing missing, unexpected and mis-shaped keys.

Conversions (torch -> flax):

- conv kernel ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``; bias as is;
- VGG ``fc6`` = torchvision ``classifier.0.weight`` ``(4096, 512 * 7 * 7)``: torch flattens pool5
  (C, H, W) in that order, so it is reshaped to ``(4096, 512, 7, 7)`` (exactly timm's
  ``pre_logits.fc1.weight``) and then transposed like a conv kernel to ``(7, 7, 512, 4096)``;
  ``fc7`` ``(4096, 4096)`` (timm ``(4096, 4096, 1, 1)``) becomes a ``(1, 1, 4096, 4096)`` kernel;
- DeepLab-LargeFOV: fc6 and fc7 are decimated as DeepLab did (:func:`decimate_kernel`): fc6's
  7x7 taps to 3x3 (taps 0, 3, 6) and every 4th output channel (4096 -> 1024); fc7 every 4th
  input and output channel (no rescaling);
- BatchNorm ``weight, bias, running_mean, running_var`` -> ``scale, bias, mean, var``;
  ``num_batches_tracked`` is torch bookkeeping and is skipped;
- the ImageNet classifier (VGG ``classifier.6`` / timm ``head.fc``, ResNet ``fc``) is dropped by
  default. ``keep_classifier=[i_0, ..., i_{K-1}]`` is FCN's trick: class k's score filter and bias
  start from ImageNet row ``i_k`` (``None`` keeps the model's initialisation, e.g. background);
  for LargeFOV the rows are decimated like fc7's inputs (every 4th of 4096).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from functools import partial

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from ccnn_jax.models.resnet import RESNET50_BLOCKS, ResNet50
from ccnn_jax.models.vgg import VGG16_CONV_NAMES, VGG16FCN

LAYOUTS = ("torchvision", "timm")
# torchvision vgg16 ``features`` indices of the 13 convolutions (ReLUs and pools in between).
VGG16_FEATURE_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
IMAGENET_FC6_KERNEL = 7  # pool5 is 7x7 at 224x224 input
LARGEFOV_SPATIAL_STEP = 3  # 7x7 taps -> 3x3 (taps 0, 3, 6)
LARGEFOV_CHANNEL_STEP = 4  # 4096 channels -> 1024
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_MAX_LISTED = 20

Converter = Callable[[np.ndarray, jax.Array], np.ndarray]  # (file array, current value) -> new


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one file tensor goes: the model variable's path, the file shape (None: any size)
    and the converter ``(file_array, current_value) -> new_value``."""

    target: tuple[str | int, ...]
    file_shape: tuple[int | None, ...]
    convert: Converter


# ----------------------------------------------------------------------------- converters


def conv_kernel_from_torch(weight_OxIxHxW: np.ndarray) -> np.ndarray:
    """torch conv weight (O, I, kh, kw) -> flax kernel (kh, kw, I, O)."""
    return np.transpose(weight_OxIxHxW, (2, 3, 1, 0))


def linear_as_conv_kernel(weight_OxF: np.ndarray, kernel: int, in_features: int) -> np.ndarray:
    """torch Linear weight (O, C * k * k) over a (C, k, k)-flattened input -> (k, k, C, O)."""
    out_features = weight_OxF.shape[0]
    weight_OxCxHxW = weight_OxF.reshape(out_features, in_features, kernel, kernel)
    return conv_kernel_from_torch(weight_OxCxHxW)


def decimate_kernel(
    kernel_HxWxIxO: np.ndarray, *, spatial_step: int = 1, in_step: int = 1, out_step: int = 1
) -> np.ndarray:
    """DeepLab's subsampling by decimation: every ``spatial_step``-th tap, ``in_step``-th input
    and ``out_step``-th output channel (7x7 taps with step 3 keep taps 0, 3, 6)."""
    return kernel_HxWxIxO[::spatial_step, ::spatial_step, ::in_step, ::out_step]


def _classifier_rows(rows: Sequence[int | None], *, is_kernel: bool, in_step: int) -> Converter:
    """ImageNet classifier rows (N, F) / (N,) -> score kernel (1, 1, F', K) / bias (K,)."""

    def convert(array: np.ndarray, current: jax.Array) -> np.ndarray:
        new = np.array(current, dtype=np.float32)
        for k, row in enumerate(rows):
            if row is None:
                continue
            if is_kernel:
                new[0, 0, :, k] = array[row, ::in_step]
            else:
                new[k] = array[row]
        return new

    return convert


def _chain(*steps: Callable[[np.ndarray], np.ndarray]) -> Converter:
    """A converter applying ``steps`` in order to the file array (the current value unused)."""

    def convert(array: np.ndarray, current: jax.Array) -> np.ndarray:
        for step in steps:
            array = step(array)
        return array

    return convert


_same = _chain()
_conv = _chain(conv_kernel_from_torch)


# ----------------------------------------------------------------------------- key layouts


def _variable(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _target_shape(model: nnx.Module, path: tuple[str | int, ...]) -> tuple[int, ...]:
    return tuple(_variable(model, path).get_value().shape)


def _conv_specs(model, key: str, target: tuple, *, bias: bool = True) -> dict[str, TensorSpec]:
    kh, kw, i, o = _target_shape(model, (*target, "kernel"))
    specs = {f"{key}.weight": TensorSpec((*target, "kernel"), (o, i, kh, kw), _conv)}
    if bias:
        specs[f"{key}.bias"] = TensorSpec((*target, "bias"), (o,), _same)
    return specs


def _bn_specs(model, key: str, target: tuple) -> dict[str, TensorSpec]:
    (features,) = _target_shape(model, (*target, "scale"))
    names = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    return {
        f"{key}.{torch_name}": TensorSpec((*target, name), (features,), _same)
        for torch_name, name in names.items()
    }


def _classifier_specs(
    target: tuple, key: str, in_features: int, rows, in_step: int
) -> dict[str, TensorSpec]:
    """The ImageNet classifier ``key`` (N, F) -> the score layer ``target`` (FCN's trick)."""
    kernel = _classifier_rows(rows or [], is_kernel=True, in_step=in_step)
    bias = _classifier_rows(rows or [], is_kernel=False, in_step=in_step)
    return {
        f"{key}.weight": TensorSpec((*target, "kernel"), (None, in_features), kernel),
        f"{key}.bias": TensorSpec((*target, "bias"), (None,), bias),
    }


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _vgg16_specs(model: VGG16FCN, layout: str, rows) -> tuple[dict[str, TensorSpec], dict]:
    names = [name for stage in VGG16_CONV_NAMES for name in stage]
    specs = {}
    for index, name in zip(VGG16_FEATURE_INDICES, names, strict=True):
        specs.update(_conv_specs(model, f"features.{index}", (name,)))
    _, _, channels, fc_features = _target_shape(model, ("fc6", "kernel"))
    step, fc6_decimate, fc7_decimate = 1, _identity, _identity
    if model.variant == "largefov":
        step = LARGEFOV_CHANNEL_STEP
        fc6_decimate = partial(decimate_kernel, spatial_step=LARGEFOV_SPATIAL_STEP, out_step=step)
        fc7_decimate = partial(decimate_kernel, in_step=step, out_step=step)
    source_features, k = fc_features * step, IMAGENET_FC6_KERNEL
    if layout == "torchvision":  # fc6/fc7 are Linear layers over the (C, H, W)-flattened pool5
        fc6_key, fc7_key, head = "classifier.0", "classifier.3", "classifier.6"
        fc6_shape = (source_features, channels * k * k)
        fc7_shape = (source_features, source_features)
        fc6_kernel = _chain(
            partial(linear_as_conv_kernel, kernel=k, in_features=channels), fc6_decimate
        )
        fc7_kernel = _chain(lambda w: w.T[None, None], fc7_decimate)
    else:  # timm: the same tensors already reshaped to conv weights
        fc6_key, fc7_key, head = "pre_logits.fc1", "pre_logits.fc2", "head.fc"
        fc6_shape = (source_features, channels, k, k)
        fc7_shape = (source_features, source_features, 1, 1)
        fc6_kernel = _chain(conv_kernel_from_torch, fc6_decimate)
        fc7_kernel = _chain(conv_kernel_from_torch, fc7_decimate)
    bias = _chain(lambda b: b[::step])
    specs[f"{fc6_key}.weight"] = TensorSpec(("fc6", "kernel"), fc6_shape, fc6_kernel)
    specs[f"{fc6_key}.bias"] = TensorSpec(("fc6", "bias"), (source_features,), bias)
    specs[f"{fc7_key}.weight"] = TensorSpec(("fc7", "kernel"), fc7_shape, fc7_kernel)
    specs[f"{fc7_key}.bias"] = TensorSpec(("fc7", "bias"), (source_features,), bias)
    head_specs = _classifier_specs(("score",), head, source_features, rows, step)
    return specs, head_specs


def _resnet50_specs(model: ResNet50, layout: str, rows) -> tuple[dict[str, TensorSpec], dict]:
    specs = {
        **_conv_specs(model, "conv1", ("conv1",), bias=False),
        **_bn_specs(model, "bn1", ("bn1",)),
    }
    for stage in range(1, len(RESNET50_BLOCKS) + 1):
        for i, block in enumerate(getattr(model, f"layer{stage}")):
            key, target = f"layer{stage}.{i}", (f"layer{stage}", i)
            parts = [(f"conv{j}", f"bn{j}", (f"conv{j}",), (f"bn{j}",)) for j in (1, 2, 3)]
            if block.downsample is not None:
                parts.append(("downsample.0", "downsample.1", ("downsample", 0), ("downsample", 1)))
            for conv, bn, conv_target, bn_target in parts:
                specs.update(
                    _conv_specs(model, f"{key}.{conv}", (*target, *conv_target), bias=False)
                )
                specs.update(_bn_specs(model, f"{key}.{bn}", (*target, *bn_target)))
    head_specs = _classifier_specs(("classifier",), "fc", model.num_features, rows, 1)
    return specs, head_specs


def tensor_specs(
    model: nnx.Module, *, layout: str = "torchvision", keep_classifier=None
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """(body, head): the file keys of the backbone and of the ImageNet classifier, each mapped
    to its :class:`TensorSpec`; the head is loaded only with ``keep_classifier``.

    Works on an abstract model (``nnx.eval_shape``): only variable shapes are read.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if keep_classifier is not None:
        keep_classifier = list(keep_classifier)
        if len(keep_classifier) != model.num_classes:
            raise ValueError(
                f"keep_classifier must list one ImageNet class index (or None) per class: "
                f"{model.num_classes} entries, got {len(keep_classifier)}"
            )
    if isinstance(model, VGG16FCN):
        return _vgg16_specs(model, layout, keep_classifier)
    if isinstance(model, ResNet50):
        return _resnet50_specs(model, layout, keep_classifier)
    raise ValueError(
        f"no pretrained key layout for {type(model).__name__} (VGG16FCN, ResNet50 only)"
    )


def expected_file_shapes(
    model: nnx.Module, *, layout: str = "torchvision", keep_classifier=None
) -> dict[str, tuple[int | None, ...]]:
    """File key -> the shape the file must hold (``None``: any size), e.g. to check a layout."""
    body, head = tensor_specs(model, layout=layout, keep_classifier=keep_classifier)
    specs = body if keep_classifier is None else {**body, **head}
    return {key: spec.file_shape for key, spec in specs.items()}


# ----------------------------------------------------------------------------- checking


def _shape_matches(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(
        e is None or s == e for s, e in zip(shape, expected, strict=True)
    )


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def check_file_shapes(
    model: nnx.Module,
    file_shapes: dict[str, tuple[int, ...]],
    *,
    path: str,
    layout: str = "torchvision",
    keep_classifier=None,
) -> dict[str, TensorSpec]:
    """The specs of every file tensor to load; ONE ValueError listing missing, unexpected and
    mis-shaped keys (and a layout hint) when ``file_shapes`` does not fit ``model``."""
    body, head = tensor_specs(model, layout=layout, keep_classifier=keep_classifier)
    specs, dropped = (body, head) if keep_classifier is None else ({**body, **head}, {})
    missing = sorted(k for k in specs if k not in file_shapes)
    unexpected = sorted(
        k
        for k in file_shapes
        if k not in specs and k not in dropped and not k.endswith(_IGNORED_SUFFIXES)
    )
    misshaped = sorted(
        f"{k}: file {tuple(file_shapes[k])}, model expects "
        f"{tuple('*' if d is None else d for d in spec.file_shape)}"
        for k, spec in specs.items()
        if k in file_shapes and not _shape_matches(tuple(file_shapes[k]), spec.file_shape)
    )
    if keep_classifier is not None and not missing and not misshaped:
        weight_key = next(k for k, spec in head.items() if spec.target[-1] == "kernel")
        num_rows = file_shapes[weight_key][0]
        bad = [r for r in keep_classifier if r is not None and not 0 <= r < num_rows]
        if bad:
            raise ValueError(
                f"{path}: keep_classifier indices {bad} are outside the file's {num_rows} "
                f"ImageNet classes ({weight_key})"
            )
    if not (missing or unexpected or misshaped):
        return specs
    parts = [
        f"{path}: the safetensors file does not fit {type(model).__name__} "
        f"in the {layout!r} key layout:"
    ]
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            parts.append(_listing(title, items))
    for other in LAYOUTS:
        if other != layout and set(tensor_specs(model, layout=other)[0]) <= set(file_shapes):
            parts.append(f"  (the keys fit layout={other!r})")
    raise ValueError("\n".join(parts))


# ----------------------------------------------------------------------------- loading


def load_safetensors(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    layout: str = "torchvision",
    keep_classifier: Sequence[int | None] | None = None,
) -> nnx.Module:
    """Loads ImageNet weights from the ``.safetensors`` file ``path`` into ``model`` (in place).

    Args:
      model: a :class:`VGG16FCN` or :class:`ResNet50`.
      path: a file in the torchvision key layout (``features.0.weight``, ``classifier.0.weight``,
        ``layer1.0.downsample.1.running_var``, ``fc.weight``, ...) or timm's (``layout="timm"``:
        ``pre_logits.fc1.weight``, ``head.fc.weight``; timm's ResNet keys equal torchvision's).
      layout: "torchvision" or "timm".
      keep_classifier: None drops the ImageNet classifier; otherwise one ImageNet class index
        (or None) per model class, whose classifier row initialises that class's score filter.

    Returns:
      ``model``, its parameters and BatchNorm statistics replaced (in the variables' dtypes).

    Example (a model inside a train state: merge, load, split again)::

      model = create_model("vgg16_fcn32", 21, rngs=nnx.Rngs(params=0))
      load_safetensors(model, "vgg16.safetensors")  # torchvision's vgg16 state dict
      load_safetensors(model, "model.safetensors", layout="timm",  # timm vgg16.tv_in1k,
                       keep_classifier=[None, 404, ...])  # one ImageNet row per class

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file is not safetensors, or its keys/shapes do not fit (one error
        listing every missing, unexpected and mis-shaped key).
    """
    tensor_specs(model, layout=layout, keep_classifier=keep_classifier)  # argument errors first
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            specs = check_file_shapes(
                model, shapes, path=path, layout=layout, keep_classifier=keep_classifier
            )
            for key, spec in specs.items():
                variable = _variable(model, spec.target)
                current = variable.get_value()
                value = spec.convert(np.asarray(f.get_tensor(key), np.float32), current)
                if value.shape != current.shape:  # a bug in a converter, not in the file
                    raise AssertionError(f"{key}: converted {value.shape} != {current.shape}")
                # same dtype and placement (sharding) as the variable it replaces
                variable.set_value(jax.device_put(value.astype(current.dtype), current.sharding))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return model
