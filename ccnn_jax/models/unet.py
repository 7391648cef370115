"""A small Flax NNX UNet for semantic segmentation.

Encoder: ``depth`` stages of (conv3x3 -> norm -> relu) x 2 followed by 2x2 max pooling, the
channel count doubling each stage from ``width``; a bottleneck block; decoder: transposed conv
2x2 (stride 2) upsampling, concatenation with the skip connection and a conv block. A 1x1 conv
head gives per-pixel class logits.

``output_stride`` s = 2^k (k <= depth) stops the decoder k stages early, so the logits come out
at (H / s, W / s) — the coarse score map on which the original FCN-based CCNN applied its
constraints. :func:`upsample_logits` brings them back to the input resolution for evaluation.

``classifier=True`` adds an image classifier on the bottleneck, the head that pretraining trains
(:meth:`UNet.classify`: a linear layer on the spatially averaged bottleneck features). As FCN
turned VGG's classifier into a convolution, the same weights then score every bottleneck
position, and those coarse class scores, upsampled, are added to the decoder's logits. Both the
classifier and the decoder head start at zero, so a pretrained network first predicts with the
classifier's scores alone (its class activation map) and the decoder learns the refinement.

``dtype`` (e.g. ``jnp.bfloat16``) is the computation dtype of every layer; parameters stay
``param_dtype`` (float32) and the logits are returned in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("batch", "group", "layer", "none")


def _norm(kind: str, features: int, rngs: nnx.Rngs, **dtypes) -> nnx.Module | None:
    if kind == "batch":
        return nnx.BatchNorm(features, momentum=0.9, rngs=rngs, **dtypes)
    if kind == "group":
        return nnx.GroupNorm(features, num_groups=min(8, features), rngs=rngs, **dtypes)
    if kind == "layer":
        return nnx.LayerNorm(features, rngs=rngs, **dtypes)
    if kind == "none":
        return None
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvBlock(nnx.Module):
    """Two (conv3x3 -> norm -> relu) layers."""

    def __init__(self, in_features: int, out_features: int, *, norm: str, rngs: nnx.Rngs, **dtypes):
        use_bias = norm == "none"
        self.conv1 = nnx.Conv(
            in_features, out_features, (3, 3), use_bias=use_bias, rngs=rngs, **dtypes
        )
        self.norm1 = _norm(norm, out_features, rngs, **dtypes)
        self.conv2 = nnx.Conv(
            out_features, out_features, (3, 3), use_bias=use_bias, rngs=rngs, **dtypes
        )
        self.norm2 = _norm(norm, out_features, rngs, **dtypes)

    def _apply_norm(self, norm, x, train: bool):
        if norm is None:
            return x
        if isinstance(norm, nnx.BatchNorm):
            return norm(x, use_running_average=not train)
        return norm(x)

    def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
        x = nnx.relu(self._apply_norm(self.norm1, self.conv1(x_BxHxWxC), train))
        return nnx.relu(self._apply_norm(self.norm2, self.conv2(x), train))


class UNet(nnx.Module):
    """UNet: images (B, H, W, C) in [0, 1] -> logits (B, H / s, W / s, K), s = output_stride.

    Args:
      num_classes: K, the number of output labels.
      width: channels of the first stage (doubled at every further stage).
      depth: number of 2x downsamplings; H and W must be divisible by 2**depth.
      norm: "batch", "group", "layer" or "none".
      output_stride: 1 (logits at input resolution) or a power of two <= 2**depth.
      in_features: input channels (3 for RGB).
      classifier: add the bottleneck classifier (see the module docstring).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); logits are returned in float32.
      param_dtype: dtype of the parameters (float32).
      rngs: parameter initialisation randomness.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        width: int = 16,
        depth: int = 3,
        norm: str = "group",
        output_stride: int = 1,
        in_features: int = 3,
        classifier: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width < 1 or depth < 0:
            raise ValueError(f"width must be >= 1 and depth >= 0, got width={width}, depth={depth}")
        up_skipped = output_stride.bit_length() - 1
        if output_stride < 1 or output_stride != 2**up_skipped or up_skipped > depth:
            raise ValueError(
                f"output_stride must be a power of two <= 2**depth = {2**depth}, "
                f"got {output_stride}"
            )
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.depth = depth
        self.output_stride = output_stride
        self.num_classes = num_classes
        self.dtype = dtype
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nnx.List(
            [
                ConvBlock(
                    in_features if i == 0 else chans[i - 1],
                    chans[i],
                    norm=norm,
                    rngs=rngs,
                    **dtypes,
                )
                for i in range(depth)
            ]
        )
        self.bottleneck = ConvBlock(
            chans[depth - 1] if depth else in_features,
            chans[depth],
            norm=norm,
            rngs=rngs,
            **dtypes,
        )
        num_up = depth - up_skipped
        ups, blocks = [], []
        for j in range(num_up):
            level = depth - 1 - j  # skip connection level the j-th up-step joins
            ups.append(
                nnx.ConvTranspose(
                    chans[level + 1], chans[level], (2, 2), strides=(2, 2), rngs=rngs, **dtypes
                )
            )
            blocks.append(ConvBlock(2 * chans[level], chans[level], norm=norm, rngs=rngs, **dtypes))
        self.up = nnx.List(ups)
        self.up_blocks = nnx.List(blocks)
        out_features = chans[depth - num_up]
        zero = nnx.initializers.zeros_init()
        head_init = {"kernel_init": zero} if classifier else {}
        self.head = nnx.Conv(out_features, num_classes, (1, 1), rngs=rngs, **head_init, **dtypes)
        self.classifier = (
            nnx.Linear(chans[depth], num_classes, kernel_init=zero, rngs=rngs, **dtypes)
            if classifier
            else None
        )

    def _encode(self, images_BxHxWxC: jax.Array, train: bool) -> tuple[jax.Array, list]:
        """Bottleneck features (B, H / 2^depth, W / 2^depth, C) and the skip features."""
        _, h, w, _ = images_BxHxWxC.shape
        factor = 2**self.depth
        if h % factor or w % factor:
            raise ValueError(
                f"image height and width must be divisible by 2**depth = {factor}, got {(h, w)}"
            )
        x = (images_BxHxWxC * 2.0 - 1.0).astype(self.dtype)
        skips = []
        for block in self.down:
            x = block(x, train=train)
            skips.append(x)
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return self.bottleneck(x, train=train), skips

    def classify(self, images_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
        r"""Image class scores (B, K): :math:`s = W^\top \operatorname{mean}_i h_i + b` over the
        bottleneck features :math:`h_i` (needs ``classifier=True``; the decoder is not run)."""
        if self.classifier is None:
            raise ValueError("UNet.classify needs a UNet built with classifier=True")
        features, _ = self._encode(images_BxHxWxC, train)
        return self.classifier(features.mean(axis=(1, 2))).astype(jnp.float32)

    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
        features, skips = self._encode(images_BxHxWxC, train)
        x = features
        for up, block in zip(self.up, self.up_blocks, strict=True):
            x = up(x)
            x = block(jnp.concatenate([x, skips.pop()], axis=-1), train=train)
        logits = self.head(x)
        if self.classifier is not None:  # the classifier scoring every bottleneck position
            logits = logits + jax.image.resize(
                self.classifier(features), logits.shape, method="bilinear"
            )
        return logits.astype(jnp.float32)


def upsample_logits(logits_BxhxwxK: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear upsampling of (coarse) logits to ``size`` = (H, W); identity when equal."""
    b, h, w, k = logits_BxhxwxK.shape
    if (h, w) == tuple(size):
        return logits_BxhxwxK
    return jax.image.resize(logits_BxhxwxK, (b, *size, k), method="bilinear")
