"""VGG-16 as a fully convolutional segmentation network (Flax NNX): FCN-32s and DeepLab-LargeFOV.

The 13 3x3 convolutions are VGG-16's (``conv1_1`` .. ``conv5_3``, torchvision's
``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}``), followed by ``fc6`` and ``fc7`` as
convolutions, dropout, and a 1x1 ``score`` layer for K classes:

- ``variant="fcn32s"`` (the CCNN paper's network): five 2x2 max pools (output stride 32),
  ``fc6`` a 7x7 convolution with 4096 channels (SAME padding, so the logits are (H/32, W/32)
  and, on a 7x7 pool5, the centre position equals ImageNet's fully connected ``fc6``), ``fc7``
  1x1 with 4096 channels. The ImageNet ``fc6``/``fc7`` weights load directly (reshaped).
- ``variant="largefov"`` (DeepLab-LargeFOV, output stride 8): pool1-3 are 3x3 stride 2 max pools,
  pool4/pool5 3x3 stride 1, conv5_x dilation 2, ``fc6`` a 3x3 convolution with dilation 12 and
  1024 channels, ``fc7`` 1x1 with 1024. ImageNet's ``fc6``/``fc7`` load decimated as in DeepLab
  (:func:`ccnn_jax.models.pretrained.decimate_kernel`).

Inputs are [0, 1] RGB, normalised with the ImageNet mean/std inside the model. ``dtype`` sets
the computation dtype (e.g. bfloat16); parameters stay ``param_dtype`` (float32) and the logits
are returned in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ccnn_jax.models.layers import (
    check_arguments,
    check_divisible,
    dropout_stream,
    imagenet_normalize,
)

# (layer name, stage) of VGG-16's convolutions; stage s has width * STAGE_MULTIPLIERS[s] channels.
VGG16_CONV_NAMES = (
    ("conv1_1", "conv1_2"),
    ("conv2_1", "conv2_2"),
    ("conv3_1", "conv3_2", "conv3_3"),
    ("conv4_1", "conv4_2", "conv4_3"),
    ("conv5_1", "conv5_2", "conv5_3"),
)
STAGE_MULTIPLIERS = (1, 2, 4, 8, 8)
VARIANTS = ("fcn32s", "largefov")
OUTPUT_STRIDES = {"fcn32s": 32, "largefov": 8}
DEFAULT_FC_FEATURES = {"fcn32s": 4096, "largefov": 1024}
LARGEFOV_FC6_DILATION = 12


def _pool(x: jax.Array, variant: str, stage: int) -> jax.Array:
    """Max pool after ``stage`` (0-based): 2x2/2 for FCN; 3x3/2 then 3x3/1 (pad 1) for LargeFOV."""
    if variant == "fcn32s":
        return nnx.max_pool(x, (2, 2), strides=(2, 2))
    stride = 2 if stage < 3 else 1
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))


class VGG16FCN(nnx.Module):
    """VGG-16 FCN: images (B, H, W, 3) in [0, 1] -> logits (B, H / s, W / s, K), float32.

    Args:
      num_classes: K, the number of output labels.
      variant: "fcn32s" (s = 32, the CCNN paper's network) or "largefov" (s = 8, DeepLab).
      width: channels of conv1_x (64 in VGG-16; stages have 1, 2, 4, 8, 8 times as many).
      fc_features: channels of fc6 and fc7 (default 4096 for fcn32s, 1024 for largefov).
      dropout_rate: dropout after fc6 and fc7 when ``train=True``.
      dtype: computation dtype (activations); ``param_dtype`` is the parameters' dtype.
      rngs: initialisation randomness; dropout uses its ``dropout`` stream (else ``params``).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        variant: str = "fcn32s",
        width: int = 64,
        fc_features: int | None = None,
        dropout_rate: float = 0.5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_arguments("variant", variant, VARIANTS, num_classes=num_classes, width=width)
        self.variant = variant
        self.num_classes = num_classes
        self.output_stride = OUTPUT_STRIDES[variant]
        self.fc_features = fc_features or DEFAULT_FC_FEATURES[variant]
        self.dtype = dtype
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_features = 3
        for stage, names in enumerate(VGG16_CONV_NAMES):
            features = width * STAGE_MULTIPLIERS[stage]
            dilation = 2 if (variant == "largefov" and stage == 4) else 1
            for name in names:
                layer = nnx.Conv(
                    in_features,
                    features,
                    (3, 3),
                    kernel_dilation=dilation,
                    padding=((dilation, dilation),) * 2,
                    **conv,
                )
                setattr(self, name, layer)
                in_features = features
        if variant == "fcn32s":
            self.fc6 = nnx.Conv(in_features, self.fc_features, (7, 7), padding="SAME", **conv)
        else:
            d = LARGEFOV_FC6_DILATION
            self.fc6 = nnx.Conv(
                in_features,
                self.fc_features,
                (3, 3),
                kernel_dilation=d,
                padding=((d, d),) * 2,
                **conv,
            )
        self.fc7 = nnx.Conv(self.fc_features, self.fc_features, (1, 1), **conv)
        self.dropout = nnx.Dropout(dropout_rate, rngs=dropout_stream(rngs))
        # FCN initialises the score layer to zero (every class equally likely at the start).
        self.score = nnx.Conv(
            self.fc_features, num_classes, (1, 1), kernel_init=nnx.initializers.zeros, **conv
        )

    def encode(self, images_BxHxWx3: jax.Array) -> list[jax.Array]:
        """Normalised images -> the five stages' pooled outputs [pool1, ..., pool5]."""
        x = imagenet_normalize(images_BxHxWx3, self.dtype)
        pooled = []
        for stage, names in enumerate(VGG16_CONV_NAMES):
            for name in names:
                x = nnx.relu(getattr(self, name)(x))
            x = _pool(x, self.variant, stage)
            pooled.append(x)
        return pooled

    def head(
        self, pool5_BxhxwxC: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """fc6 -> relu -> dropout -> fc7 -> relu -> dropout -> score (logits in ``dtype``)."""
        x = self.dropout(nnx.relu(self.fc6(pool5_BxhxwxC)), deterministic=not train, rngs=rngs)
        x = self.dropout(nnx.relu(self.fc7(x)), deterministic=not train, rngs=rngs)
        return self.score(x)

    def __call__(
        self, images_BxHxWx3: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        check_divisible(images_BxHxWx3, self.output_stride, f"VGG-16 {self.variant}")
        pool5 = self.encode(images_BxHxWx3)[-1]
        return self.head(pool5, train=train, rngs=rngs).astype(jnp.float32)
