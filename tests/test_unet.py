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
