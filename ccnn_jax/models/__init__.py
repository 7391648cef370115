"""Segmentation networks (Flax NNX)."""

from ccnn_jax.models.unet import UNet, upsample_logits

__all__ = ["UNet", "upsample_logits"]
