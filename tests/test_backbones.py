"""VGG-16 FCN / dilated ResNet-50 and their ImageNet weights from safetensors.

Fabricated files carry the published key names and shapes (:mod:`torch_reference`, built from
the torchvision / timm definitions, not from the library's mapping); the loaded models are
checked against numpy forward passes on the torch-layout arrays.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_reference import (
    assert_close,
    fabricate,
    np_bottleneck,
    np_conv,
    np_max_pool,
    np_resnet50_features,
    np_resnet50_stem,
    np_vgg16_logits,
    relu,
    resnet50_torchvision_shapes,
    to_nchw,
    vgg16_timm_shapes,
    vgg16_timm_tensors,
    vgg16_torchvision_shapes,
    write,
)

from ccnn_jax.models import MODELS, VGG16FCN, ResNet50, UNet, create_model, load_safetensors
from ccnn_jax.models.pretrained import expected_file_shapes


@functools.cache
def _abstract(cls, args, kw):
    return nnx.split(nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **dict(kw))))


def build(cls, *args, **kw):
    """The model with deterministic filler values instead of its initialisers (compiling the
    initialisers of a full-size backbone takes a minute on a small CPU; the tests load weights)."""
    graphdef, abstract = _abstract(cls, args, tuple(sorted(kw.items())))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        if path[-2].key in ("scale", "var", "count"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.05 * rng.standard_normal(leaf.shape), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def params_snapshot(model):
    return [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


# ----------------------------------------------------------------------------- key layouts


@pytest.mark.parametrize("layout", ["torchvision", "timm"])
def test_vgg16_fcn32_expects_the_published_keys_and_shapes(layout):
    # full width, shapes only (nnx.eval_shape: nothing materialised)
    model = nnx.eval_shape(lambda: VGG16FCN(21, rngs=nnx.Rngs(0)))
    published = vgg16_torchvision_shapes()
    if layout == "timm":
        published = vgg16_timm_shapes(published)
        assert published["pre_logits.fc1.weight"] == (4096, 512, 7, 7)
        assert published["head.fc.weight"] == (1000, 4096)
    head = "classifier.6" if layout == "torchvision" else "head.fc"
    assert len(published) == 32
    body = {k: v for k, v in published.items() if not k.startswith(head)}
    assert expected_file_shapes(model, layout=layout) == body
    kept = expected_file_shapes(model, layout=layout, keep_classifier=[None] * 21)
    assert kept == body | {f"{head}.weight": (None, 4096), f"{head}.bias": (None,)}
    if layout == "torchvision":
        assert kept["classifier.0.weight"] == (4096, 25088)


def test_vgg16_largefov_reads_the_imagenet_fc_shapes():
    model = nnx.eval_shape(lambda: VGG16FCN(21, variant="largefov", rngs=nnx.Rngs(0)))
    published = vgg16_torchvision_shapes()
    expected = {k: v for k, v in published.items() if not k.startswith("classifier.6")}
    assert expected_file_shapes(model) == expected
    assert model.fc6.kernel.shape == (3, 3, 512, 1024)
    assert model.fc7.kernel.shape == (1, 1, 1024, 1024)


def test_resnet50_expects_the_published_keys_and_shapes():
    model = nnx.eval_shape(lambda: ResNet50(21, output_stride=8, rngs=nnx.Rngs(0)))
    published = resnet50_torchvision_shapes()
    assert len(published) == 320  # torchvision resnet50().state_dict()
    body = {
        k: v
        for k, v in published.items()
        if not k.endswith("num_batches_tracked") and not k.startswith("fc.")
    }
    for layout in ("torchvision", "timm"):  # timm's resnet50 uses torchvision's names
        assert expected_file_shapes(model, layout=layout) == body


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("layout", ["torchvision", "timm"])
def test_vgg16_fcn32_matches_numpy_torchvision_forward(tmp_path, layout):
    # reduced width (the key names are the published ones; the mapping is width-independent)
    t = fabricate(vgg16_torchvision_shapes(width=4, fc=16, classes=10))
    path = write(tmp_path, t if layout == "torchvision" else vgg16_timm_tensors(t))
    rows = [3, None, 9, 0, 7]
    model = build(VGG16FCN, 5, width=4, fc_features=16)
    initial_score = np.array(model.score.kernel)
    load_safetensors(model, path, layout=layout, keep_classifier=rows)
    images = jax.random.uniform(jax.random.key(1), (2, 224, 224, 3))
    # conv1_1 -> relu -> conv1_2 -> relu -> pool1
    x = to_nchw(images)
    x = relu(np_conv(x, t["features.0.weight"], t["features.0.bias"], pad=1))
    x = relu(np_conv(x, t["features.2.weight"], t["features.2.bias"], pad=1))
    pool1 = np_max_pool(x, 2, 2).transpose(0, 2, 3, 1)
    assert_close(model.encode(images)[0], pool1)
    # the whole network: at the centre of the 7x7 score map, FCN-32s is ImageNet's classifier
    logits = np.asarray(nnx.jit(lambda m, x: m(x, train=False))(model, images))
    assert logits.shape == (2, 7, 7, 5) and logits.dtype == np.float32
    imagenet = np_vgg16_logits(t, images)
    kept = [k for k, r in enumerate(rows) if r is not None]
    assert_close(logits[:, 3, 3, kept], imagenet[:, [rows[k] for k in kept]])
    np.testing.assert_array_equal(model.score.kernel[..., 1], initial_score[..., 1])  # None: kept


def test_vgg16_fc6_is_the_linear_layer_on_a_7x7_pool5(tmp_path):
    t = fabricate(vgg16_torchvision_shapes(width=4, fc=16))
    model = load_safetensors(build(VGG16FCN, 3, width=4, fc_features=16), write(tmp_path, t))
    pool5 = np.random.default_rng(2).standard_normal((1, 7, 7, 32)).astype(np.float32)
    flat_chw = pool5[0].transpose(2, 0, 1).reshape(-1)
    expected = t["classifier.0.weight"].astype(np.float64) @ flat_chw + t["classifier.0.bias"]
    assert_close(model.fc6(jnp.asarray(pool5))[0, 3, 3], expected)


def test_vgg16_largefov_decimates_fc6_and_fc7(tmp_path):
    t = fabricate(vgg16_torchvision_shapes(width=4, fc=4 * 8))
    model = load_safetensors(
        build(VGG16FCN, 3, variant="largefov", width=4, fc_features=8), write(tmp_path, t)
    )
    w6 = t["classifier.0.weight"].reshape(32, 32, 7, 7)  # (O, C, H, W): torch's flatten order
    k6 = np.asarray(model.fc6.kernel)
    for i, j, c, o in [(0, 0, 0, 0), (1, 2, 5, 3), (2, 2, 31, 7), (2, 1, 17, 6)]:
        assert k6[i, j, c, o] == w6[4 * o, c, 3 * i, 3 * j]
    np.testing.assert_array_equal(model.fc6.bias, t["classifier.0.bias"][::4])
    k7 = np.asarray(model.fc7.kernel)
    assert k7[0, 0, 5, 2] == t["classifier.3.weight"][8, 20]
    np.testing.assert_array_equal(model.fc7.bias, t["classifier.3.bias"][::4])
    conv5_3 = t["features.28.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.conv5_3.kernel, conv5_3)


def test_resnet50_published_file_first_blocks_match_numpy(tmp_path):
    # full width, the published layout (with num_batches_tracked; fc dropped by default)
    t = fabricate(resnet50_torchvision_shapes())
    model = load_safetensors(build(ResNet50, 4, output_stride=8), write(tmp_path, t))
    images = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
    # conv1 + bn1 + relu + maxpool, then the first bottleneck (with its downsample branch)
    stem = np_resnet50_stem(t, images)
    assert_close(model.stem(images), stem.transpose(0, 2, 3, 1))
    block = np_bottleneck(stem, t, "layer1.0", 1, 1)
    assert_close(model.layer1[0](model.stem(images), train=False), block.transpose(0, 2, 3, 1))


def test_dilated_resnet50_matches_numpy_torchvision_forward(tmp_path):
    # output stride 8 = torchvision's replace_stride_with_dilation=[False, True, True]
    t = fabricate(resnet50_torchvision_shapes(width=8))
    model = load_safetensors(build(ResNet50, 4, output_stride=8, width=8), write(tmp_path, t))
    images = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
    features = nnx.jit(lambda m, x: m.features(x))(model, images)
    expected = np_resnet50_features(t, images, (False, True, True))
    assert_close(features, expected.transpose(0, 2, 3, 1), tol=1e-3)


def test_resnet50_keeps_imagenet_classifier_rows(tmp_path):
    t = fabricate(resnet50_torchvision_shapes(width=4, classes=50))
    model = build(ResNet50, 3, width=4, output_stride=32)
    load_safetensors(model, write(tmp_path, t), keep_classifier=[49, 0, 17])
    np.testing.assert_array_equal(model.classifier.kernel[0, 0], t["fc.weight"][[49, 0, 17]].T)
    np.testing.assert_array_equal(model.classifier.bias, t["fc.bias"][[49, 0, 17]])


# ----------------------------------------------------------------------------- errors


def _vgg_file(tmp_path, edit):
    t = fabricate(vgg16_torchvision_shapes(width=4, fc=16))
    edit(t)
    return write(tmp_path, t)


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path):
    def edit(t):
        del t["features.5.weight"]
        t["features.1.weight"] = np.zeros((4, 4, 3, 3), np.float32)
        t["classifier.3.weight"] = np.zeros((16, 15), np.float32)

    path = _vgg_file(tmp_path, edit)
    model = build(VGG16FCN, 3, width=4, fc_features=16)
    before = params_snapshot(model)
    with pytest.raises(ValueError) as error:
        load_safetensors(model, path)
    message = str(error.value)
    assert str(path) in message
    assert "missing (1):\n    features.5.weight" in message
    assert "unexpected (1):\n    features.1.weight" in message
    assert "classifier.3.weight: file (16, 15), model expects (16, 16)" in message
    # nothing was written: checked before loading
    for a, b in zip(before, params_snapshot(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop("features.28.bias"), r"missing \(1\):\n    features\.28\.bias"),
        (
            lambda t: t.update({"features.30.weight": t["features.28.weight"]}),
            r"unexpected \(1\):\n    features\.30\.weight",
        ),
        (
            lambda t: t.update({"features.0.weight": np.zeros((4, 3, 5, 5), np.float32)}),
            r"features\.0\.weight: file \(4, 3, 5, 5\), model expects \(4, 3, 3, 3\)",
        ),
    ],
)
def test_each_wrong_key_names_itself(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        load_safetensors(build(VGG16FCN, 3, width=4, fc_features=16), _vgg_file(tmp_path, edit))


def test_wrong_layout_suggests_the_right_one(tmp_path):
    t = vgg16_timm_tensors(fabricate(vgg16_torchvision_shapes(width=4, fc=16)))
    path = write(tmp_path, t)
    with pytest.raises(ValueError, match="pre_logits.fc1.weight(.|\n)*layout='timm'"):
        load_safetensors(build(VGG16FCN, 3, width=4, fc_features=16), path)


def test_resnet_without_classifier_and_wrong_classifier_arguments(tmp_path):
    t = fabricate(resnet50_torchvision_shapes(width=4, classes=10))
    del t["fc.weight"], t["fc.bias"]  # a headless checkpoint loads without keep_classifier
    path = write(tmp_path, t)
    model = build(ResNet50, 2, width=4)
    load_safetensors(model, path)
    with pytest.raises(ValueError, match="missing.*\n    fc.bias\n    fc.weight"):
        load_safetensors(model, path, keep_classifier=[1, 2])
    with pytest.raises(ValueError, match="keep_classifier.*2 entries, got 3"):
        load_safetensors(model, path, keep_classifier=[1, 2, 3])
    full = write(tmp_path, fabricate(resnet50_torchvision_shapes(width=4, classes=10)), "f.st")
    with pytest.raises(ValueError, match="keep_classifier indices \\[10\\].*10 ImageNet"):
        load_safetensors(model, full, keep_classifier=[1, 10])
    with pytest.raises(ValueError, match="layout"):
        load_safetensors(model, full, layout="caffe")


def test_unreadable_files_name_the_path(tmp_path):
    model = build(ResNet50, 2, width=4)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_safetensors(model, tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors"):
        load_safetensors(model, bad)
    with pytest.raises(ValueError, match="UNet"):
        load_safetensors(build(UNet, 2, width=4, depth=1), bad)


# ----------------------------------------------------------------------------- shapes, modes, dtype


@pytest.mark.parametrize(
    "name, stride, kw",
    [
        ("vgg16_fcn32", 32, {}),
        ("vgg16_largefov", 8, {}),
        ("resnet50_os8", 8, {}),
        ("resnet50_os16", 16, {}),
        ("unet", 1, {"width": 4, "depth": 2}),
    ],
)
def test_create_model_output_strides(name, stride, kw):
    model = nnx.eval_shape(lambda: create_model(name, 21, rngs=nnx.Rngs(0), **kw))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
    for train in (True, False):
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=train), state, x)
        assert out.shape == (2, 64 // stride, 96 // stride, 21) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="divisible"):
        model(jax.ShapeDtypeStruct((1, 66, 64, 3), jnp.float32))


def test_create_model_rejects_unknown_names_and_fixed_arguments():
    assert set(MODELS) >= {"unet", "vgg16_fcn32", "vgg16_largefov", "resnet50_os8", "resnet50_os16"}
    with pytest.raises(ValueError, match="resnet50_os8"):
        create_model("resnet18", 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="output_stride"):
        create_model("resnet50_os8", 3, rngs=nnx.Rngs(0), output_stride=16)
    with pytest.raises(ValueError, match="variant"):
        VGG16FCN(3, variant="fcn8s", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="output_stride must be one of"):
        ResNet50(3, output_stride=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="width must be >= 1"):
        VGG16FCN(3, width=0, rngs=nnx.Rngs(0))


def test_train_mode_dropout_and_batchnorm(tmp_path):
    vgg = load_safetensors(
        build(VGG16FCN, 3, width=4, fc_features=16),
        write(tmp_path, fabricate(vgg16_torchvision_shapes(width=4, fc=16))),
        keep_classifier=[0, 1, 2],
    )
    forward = nnx.jit(lambda model, x, train: model(x, train=train), static_argnames="train")
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    np.testing.assert_array_equal(forward(vgg, x, False), forward(vgg, x, False))
    assert not np.allclose(forward(vgg, x, True), forward(vgg, x, True))  # fresh dropout masks
    resnet = build(ResNet50, 3, width=4)
    before = jax.tree.map(np.array, nnx.state(resnet, nnx.BatchStat))
    forward(resnet, x, True)
    changed = jax.tree.map(
        lambda a, b: not np.allclose(a, b), before, nnx.state(resnet, nnx.BatchStat)
    )
    assert all(jax.tree.leaves(changed))
    # eval mode: an image's logits do not depend on the rest of the batch
    np.testing.assert_allclose(
        forward(resnet, x, False)[:1], forward(resnet, x[:1], False), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "cls, kw, file_shapes",
    [
        (VGG16FCN, {"width": 8, "fc_features": 32}, vgg16_torchvision_shapes(width=8, fc=32)),
        (ResNet50, {"width": 8, "output_stride": 8}, resnet50_torchvision_shapes(width=8)),
    ],
)
def test_bfloat16_tracks_float32(tmp_path, cls, kw, file_shapes):
    path = write(tmp_path, fabricate(file_shapes))
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = load_safetensors(
            build(cls, 4, dtype=dtype, **kw), path, keep_classifier=[0, 1, 2, 3]
        )
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
        logits[dtype] = np.asarray(nnx.jit(lambda m, x: m(x, train=False))(model, x))
    full, half = logits[jnp.float32], logits[jnp.bfloat16]
    assert half.dtype == np.float32
    relative = np.linalg.norm(half - full) / np.linalg.norm(full)
    assert 0 < relative < 0.05, relative


@pytest.mark.slow
def test_full_size_vgg16_file_loads(tmp_path):
    # the published vgg16 file at full size (~550 MB): every tensor through the real path
    t = fabricate(vgg16_torchvision_shapes())
    path = write(tmp_path, t)
    model = load_safetensors(build(VGG16FCN, 3), path, keep_classifier=[0, 500, 999])
    np.testing.assert_array_equal(
        model.fc6.kernel[2, 5, 100], t["classifier.0.weight"].reshape(4096, 512, 7, 7)[:, 100, 2, 5]
    )
    pool5 = np.random.default_rng(2).standard_normal((1, 7, 7, 512)).astype(np.float32)
    expected = (
        t["classifier.0.weight"].astype(np.float64) @ pool5[0].transpose(2, 0, 1).ravel()
        + t["classifier.0.bias"]
    )
    assert_close(model.fc6(jnp.asarray(pool5))[0, 3, 3], expected)
    images = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
    x = relu(np_conv(to_nchw(images), t["features.0.weight"], t["features.0.bias"], pad=1))
    x = relu(np_conv(x, t["features.2.weight"], t["features.2.bias"], pad=1))
    assert_close(model.encode(images)[0], np_max_pool(x, 2, 2).transpose(0, 2, 3, 1))
