"""Segmentation networks (Flax NNX), selected by name with :func:`create_model`.

Every model maps images (B, H, W, 3) in [0, 1] to float32 logits (B, H / s, W / s, K):
``model(images, train=bool)``. ImageNet weights load with
:func:`ccnn_jax.models.pretrained.load_safetensors`.
"""

from flax import nnx

from ccnn_jax.models.pretrained import load_safetensors
from ccnn_jax.models.resnet import ResNet50
from ccnn_jax.models.unet import UNet, upsample_logits
from ccnn_jax.models.vgg import VGG16FCN

# name -> (class, fixed keyword arguments)
MODELS = {
    "unet": (UNet, {}),
    "vgg16_fcn32": (VGG16FCN, {"variant": "fcn32s"}),
    "vgg16_largefov": (VGG16FCN, {"variant": "largefov"}),
    "resnet50_os8": (ResNet50, {"output_stride": 8}),
    "resnet50_os16": (ResNet50, {"output_stride": 16}),
}


def create_model(name: str, num_classes: int, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """The model ``name`` (one of :data:`MODELS`) with K = ``num_classes`` outputs.

    ``kwargs`` go to the class (e.g. ``dtype=jnp.bfloat16``, ``width=...``, UNet's ``depth``).
    """
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
    cls, fixed = MODELS[name]
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"model {name!r} fixes {clash}; choose another name instead")
    return cls(num_classes, rngs=rngs, **fixed, **kwargs)


__all__ = [
    "MODELS",
    "ResNet50",
    "UNet",
    "VGG16FCN",
    "create_model",
    "load_safetensors",
    "upsample_logits",
]
