"""Dilated ResNet-50 for segmentation (Flax NNX), in the torchvision / timm layout.

torchvision's ResNet-50 (v1.5: the stride sits on the 3x3 ``conv2`` of a bottleneck) with
bottleneck blocks [3, 4, 6, 3]. ``output_stride`` 8 or 16 replaces the stride of the last
stages by dilation exactly as torchvision's ``replace_stride_with_dilation`` does (the first
block of a dilated stage keeps the previous dilation, the others use the new one), which is how
DeepLabV3 uses it; 32 is the classification network. A 1x1 ``classifier`` conv gives K class
logits at (H / s, W / s).

Attribute names follow the torchvision state dict (``conv1``, ``bn1``, ``layer1[0].conv1``,
``layer1[0].downsample[0]`` / ``[1]``, ...) so :mod:`ccnn_jax.models.pretrained` maps
``layer1.0.downsample.1.running_mean`` to ``layer1[0].downsample[1].mean`` by name.

Inputs are [0, 1] RGB, normalised with the ImageNet mean/std inside the model. ``dtype`` sets
the computation dtype; parameters and batch statistics stay float32; logits come out float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ccnn_jax.models.layers import check_arguments, check_divisible, imagenet_normalize

RESNET50_BLOCKS = (3, 4, 6, 3)
EXPANSION = 4
OUTPUT_STRIDES = (8, 16, 32)
# Dilate (instead of stride) stages 2, 3, 4 (torchvision's replace_stride_with_dilation).
DILATE_STAGES = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
# torch BatchNorm2d: momentum 0.1 (flax's 0.9), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _conv(in_f, out_f, kernel, *, stride=1, dilation=1, dtype, param_dtype, rngs) -> nnx.Conv:
    """Bias-free conv with torch's explicit padding ``dilation * (kernel - 1) // 2``."""
    pad = dilation * (kernel - 1) // 2
    return nnx.Conv(
        in_f,
        out_f,
        (kernel, kernel),
        strides=stride,
        kernel_dilation=dilation,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        rngs=rngs,
    )


def _bn(features, *, dtype, param_dtype, rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        features,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), each with BatchNorm, plus shortcut."""

    def __init__(self, in_features, planes, *, stride, dilation, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        out_features = planes * EXPANSION
        self.conv1 = _conv(in_features, planes, 1, **kw)
        self.bn1 = _bn(planes, **kw)
        self.conv2 = _conv(planes, planes, 3, stride=stride, dilation=dilation, **kw)
        self.bn2 = _bn(planes, **kw)
        self.conv3 = _conv(planes, out_features, 1, **kw)
        self.bn3 = _bn(out_features, **kw)
        if stride != 1 or in_features != out_features:
            self.downsample = nnx.List(
                [_conv(in_features, out_features, 1, stride=stride, **kw), _bn(out_features, **kw)]
            )
        else:
            self.downsample = None

    def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
        avg = not train
        y = nnx.relu(self.bn1(self.conv1(x_BxHxWxC), use_running_average=avg))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=avg))
        y = self.bn3(self.conv3(y), use_running_average=avg)
        shortcut = x_BxHxWxC
        if self.downsample is not None:
            conv, bn = self.downsample
            shortcut = bn(conv(x_BxHxWxC), use_running_average=avg)
        return nnx.relu(y + shortcut)


class ResNet50(nnx.Module):
    """Dilated ResNet-50: images (B, H, W, 3) in [0, 1] -> logits (B, H / s, W / s, K), float32.

    Args:
      num_classes: K, the number of output labels.
      output_stride: s = 8, 16 or 32 (layers 3 and 4, only 4, or no stage dilated).
      width: stem channels (64 in ResNet-50; stage i has width * 2**i planes, x4 outputs).
      dtype: computation dtype (activations); ``param_dtype`` is the parameters' dtype.
      rngs: parameter initialisation randomness.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        output_stride: int = 8,
        width: int = 64,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_arguments(
            "output_stride", output_stride, OUTPUT_STRIDES, num_classes=num_classes, width=width
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.dtype = dtype
        self.conv1 = _conv(3, width, 7, stride=2, **kw)
        self.bn1 = _bn(width, **kw)
        in_features, dilation = width, 1
        dilate = (False, *DILATE_STAGES[output_stride])
        for stage, num_blocks in enumerate(RESNET50_BLOCKS):
            planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            previous_dilation = dilation
            if dilate[stage]:
                dilation, stride = dilation * stride, 1
            blocks = []
            for i in range(num_blocks):
                blocks.append(
                    Bottleneck(
                        in_features,
                        planes,
                        stride=stride if i == 0 else 1,
                        dilation=previous_dilation if i == 0 else dilation,
                        **kw,
                    )
                )
                in_features = planes * EXPANSION
            setattr(self, f"layer{stage + 1}", nnx.List(blocks))
        self.num_features = in_features
        self.classifier = nnx.Conv(
            in_features,
            num_classes,
            (1, 1),
            kernel_init=nnx.initializers.normal(0.01),
            **kw,
        )

    def stem(self, images_BxHxWx3: jax.Array, *, train: bool = False) -> jax.Array:
        """Normalise -> conv1 (7x7/2) -> bn1 -> relu -> max pool 3x3/2 (pad 1): (B, H/4, W/4, C)."""
        x = self.conv1(imagenet_normalize(images_BxHxWx3, self.dtype))
        x = nnx.relu(self.bn1(x, use_running_average=not train))
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    def features(self, images_BxHxWx3: jax.Array, *, train: bool = False) -> jax.Array:
        """The stem and the four stages: (B, H / s, W / s, 2048 * width / 64)."""
        x = self.stem(images_BxHxWx3, train=train)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x, train=train)
        return x

    def __call__(self, images_BxHxWx3: jax.Array, *, train: bool = False) -> jax.Array:
        check_divisible(images_BxHxWx3, self.output_stride, "ResNet-50 output stride")
        x = self.features(images_BxHxWx3, train=train)
        return self.classifier(x).astype(jnp.float32)
