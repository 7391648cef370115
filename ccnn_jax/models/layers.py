"""Pieces the ImageNet backbones share: input normalisation, size checks, dropout streams."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# torchvision / timm ImageNet statistics of [0, 1] RGB inputs.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


def imagenet_normalize(images_BxHxWx3: jax.Array, dtype) -> jax.Array:
    """(x - mean) / std per RGB channel, computed in float32, then cast to ``dtype``."""
    if images_BxHxWx3.shape[-1] != 3:
        raise ValueError(f"images must be RGB (last axis 3), got shape {images_BxHxWx3.shape}")
    mean = jnp.asarray(IMAGENET_MEAN_RGB, jnp.float32)
    std = jnp.asarray(IMAGENET_STD_RGB, jnp.float32)
    return ((images_BxHxWx3.astype(jnp.float32) - mean) / std).astype(dtype)


def check_arguments(choice_name: str, choice, choices, **sizes: int) -> None:
    """Raises ValueError unless ``choice`` is one of ``choices`` and every size is >= 1."""
    if choice not in choices:
        raise ValueError(f"{choice_name} must be one of {tuple(choices)}, got {choice!r}")
    small = {name: size for name, size in sizes.items() if size < 1}
    if small:
        raise ValueError(f"{' and '.join(small)} must be >= 1, got {small}")


def check_divisible(images_BxHxWxC: jax.Array, factor: int, what: str) -> None:
    """Raises ValueError unless the image height and width are multiples of ``factor``."""
    _, h, w, _ = images_BxHxWxC.shape
    if h % factor or w % factor:
        raise ValueError(
            f"image height and width must be divisible by {factor} ({what}), got {(h, w)}"
        )


def dropout_stream(rngs: nnx.Rngs) -> nnx.RngStream:
    """The ``dropout`` stream when ``rngs`` has one, else ``params`` (or its default)."""
    return rngs["dropout"] if "dropout" in rngs else rngs["params"]
