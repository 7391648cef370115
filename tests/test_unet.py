"""UNet: shapes for every norm / output stride, BatchNorm train vs eval, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccnn_jax.models import UNet, upsample_logits


def _unet(**kw):
    kw = {"width": 4, "depth": 2, **kw}
    return nnx.jit(lambda: UNet(5, rngs=nnx.Rngs(params=jax.random.key(0, impl="rbg")), **kw))()


@pytest.mark.parametrize("norm", ["batch", "group", "layer", "none"])
@pytest.mark.parametrize("output_stride", [1, 2, 4])
def test_logit_shapes(norm, output_stride):
    # shapes only (abstract evaluation, nothing compiled)
    abstract = nnx.eval_shape(
        lambda: UNet(5, width=4, depth=2, norm=norm, output_stride=output_stride, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    x = jax.ShapeDtypeStruct((2, 16, 24, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=True), state, x)
    assert out.shape == (2, 16 // output_stride, 24 // output_stride, 5)


def test_coarse_logits_upsample_to_input_size():
    model = _unet(norm="group", output_stride=2)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 24, 3))
    logits = model(x, train=False)
    assert logits.shape == (2, 8, 12, 5)
    assert np.all(np.isfinite(np.asarray(logits)))
    up = upsample_logits(logits, (16, 24))
    assert up.shape == (2, 16, 24, 5)
    np.testing.assert_allclose(up.mean(axis=(1, 2)), logits.mean(axis=(1, 2)), rtol=0.1, atol=0.05)
    assert upsample_logits(up, (16, 24)) is up


def test_batchnorm_train_updates_stats_eval_is_per_image():
    model = _unet(norm="batch")
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
    before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    model(x, train=True)
    after = nnx.state(model, nnx.BatchStat)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, after)
    assert any(jax.tree.leaves(changed))
    # eval mode: an image's logits do not depend on the rest of the batch
    full = model(x, train=False)
    single = model(x[:1], train=False)
    np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-5)


def test_skip_connections_reach_the_output():
    model = _unet(norm="none", depth=1)
    x = jnp.zeros((1, 8, 8, 3))
    g = jax.grad(lambda x: model(x)[0, 0, 0, 0])(x)
    # the pixel's own neighbourhood matters (the full-resolution skip path)
    assert np.abs(np.asarray(g[0, 0, 0])).sum() > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"output_stride": 3}, "output_stride"),
        ({"output_stride": 8}, "output_stride"),
        ({"norm": "instance"}, "norm"),
        ({"width": 0}, "width"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        UNet(3, rngs=nnx.Rngs(0), **{"width": 4, "depth": 2, **kw})


def test_image_size_must_be_divisible():
    abstract = nnx.eval_shape(lambda: UNet(3, width=4, depth=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="divisible"):
        abstract(jax.ShapeDtypeStruct((1, 10, 16, 3), jnp.float32))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_bfloat16_computation_tracks_float32_with_float32_params(norm):
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    full = _unet(norm=norm)
    half = _unet(norm=norm, dtype=jnp.bfloat16)
    nnx.update(half, nnx.state(full))  # the same float32 parameters
    assert {p.dtype for p in jax.tree.leaves(nnx.state(half, nnx.Param))} == {jnp.dtype("float32")}
    forward = nnx.jit(lambda model, x: model(x, train=False))
    out_full, out_half = forward(full, x), forward(half, x)
    assert out_half.dtype == jnp.float32
    relative = jnp.linalg.norm(out_half - out_full) / jnp.linalg.norm(out_full)
    assert 0 < relative < 0.05, relative


def test_classifier_scores_every_bottleneck_position_fcn_style():
    """classify = linear(mean_i h_i); with the decoder head at zero (its initial value) the
    logits are the same linear map applied at every bottleneck position, upsampled, whose
    spatial mean is the image score (FCN's classifier-to-convolution conversion)."""
    model = _unet(norm="batch", depth=2, output_stride=1, classifier=True)
    classifier = model.classifier
    classifier.kernel[...] = jax.random.normal(jax.random.key(2), classifier.kernel.shape)
    classifier.bias[...] = jnp.arange(5.0)
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), 0.0)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    features, _ = model._encode(x, False)
    per_position = classifier(features)  # (2, 4, 4, 5) coarse class scores
    np.testing.assert_allclose(
        model.classify(x), per_position.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5
    )
    expected = jax.image.resize(per_position, (2, 16, 16, 5), method="bilinear")
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="classifier=True"):
        _unet().classify(x)
