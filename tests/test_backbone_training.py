"""Backbones in training: selection by ``config.model.name``, ImageNet weights from
``config.model.pretrained`` on a fresh run only, ``config.dtype = "bfloat16"``, Caffe's SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import _batch, _Meta, _tiny_config
from torch_reference import fabricate, vgg16_torchvision_shapes, write

from ccnn_jax import losses, models, run, train
from ccnn_jax.configs import synthetic

# The published VGG-16 layout at 1/16 of its width and 1/256 of its fc6/fc7 channels (16);
# LargeFOV keeps every 4th of those.
SMALL_VGG = {"backbone_width": 4, "fc_features": 16}
SMALL_LARGEFOV = {"backbone_width": 4, "fc_features": 4}


def _small_vgg_config(name="vgg16_largefov", **fields):
    config = synthetic.get_config("ccnn,tiny")
    config.pretrain.steps = config.pretrain.easy_steps = 0
    config.model.name = name
    config.model.update({**(SMALL_LARGEFOV if "largefov" in name else SMALL_VGG), **fields})
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from ccnn_jax.data import pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare("ccnn_synthetic/tiny", data_dir=path)
    return path


def test_model_is_selected_by_name_with_its_own_fields():
    config = _small_vgg_config("vgg16_fcn32", dropout_rate=0.25)
    config.model.width = 64  # a UNet field: ignored by the backbone
    graphdef, abstract, _ = train.create_train_state(config, 9, abstract=True)
    model = nnx_model(graphdef, abstract)
    assert isinstance(model, models.VGG16FCN) and model.variant == "fcn32s"
    assert model.conv1_1.out_features == 4 and model.fc_features == 16
    assert model.dropout.rate == 0.25

    config = _small_vgg_config("resnet50_os16")
    model = nnx_model(*train.create_train_state(config, 9, abstract=True)[:2])
    assert isinstance(model, models.ResNet50) and model.output_stride == 16
    assert model.conv1.out_features == 4

    config = synthetic.get_config("ccnn,tiny")  # the default stays the configured UNet
    assert config.model.name == "unet" and config.dtype == "float32"
    model = nnx_model(*train.create_train_state(config, 9, abstract=True)[:2])
    assert isinstance(model, models.UNet)
    assert (model.depth, model.output_stride, model.classifier is not None) == (2, 2, True)
    assert model.down[0].conv1.out_features == config.model.width == 4


def nnx_model(graphdef, abstract_state):
    return train.merge_model(graphdef, abstract_state)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model.name", "vgg19", "config.model.name must be one of"),
        ("dtype", "float16", "config.dtype must be one of"),
        ("model.pretrained", "/x.safetensors", "config.model.pretrained: ImageNet weights"),
        ("pretrain.steps", 10, "config.pretrain.steps"),
        ("optimizer", "lion", "config.optimizer must be"),
    ],
)
def test_bad_model_settings_name_the_field(field, value, match):
    config = synthetic.get_config("ccnn,tiny")
    config.pretrain.steps = 0
    if field == "pretrain.steps":
        config.model.name = "resnet50_os8"
    parent, _, name = field.rpartition(".")
    (config[parent] if parent else config)[name] = value
    with pytest.raises(ValueError, match=match):
        train.create_train_state(config, 9, abstract=True)


def test_fresh_run_loads_the_pretrained_file_and_a_resumed_run_never_reads_it(data_dir, tmp_path):
    tensors = fabricate(vgg16_torchvision_shapes(width=4, fc=16))
    path = write(tmp_path, tensors)
    config = _small_vgg_config(pretrained=str(path))
    config.data_dir = data_dir
    config.num_steps, config.learning_rate = 1, 0.0  # one step that leaves the weights alone
    out = run.train(config, tmp_path / "run", progress=False)
    params = jax.device_get(out.state.params)
    np.testing.assert_array_equal(
        params["conv1_1"]["kernel"].get_value(),
        np.transpose(tensors["features.0.weight"], (2, 3, 1, 0)),
    )
    np.testing.assert_array_equal(
        params["conv5_3"]["bias"].get_value(), tensors["features.28.bias"]
    )
    # LargeFOV's fc7: every 4th of the 16 ImageNet channels
    np.testing.assert_array_equal(
        params["fc7"]["bias"].get_value(), tensors["classifier.3.bias"][::4]
    )

    path.write_bytes(b"not a safetensors file any more")
    again = run.train(config, tmp_path / "run", progress=False)  # restores; the file is not read
    assert again.resumed_from == 1
    config.model.pretrained = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        run.train(config, tmp_path / "fresh", progress=False)


def _losses_over_steps(config, num_steps=6):
    graphdef, state, tx = train.create_train_state(config, _Meta.num_classes)
    steps = train.make_steps(graphdef, tx, losses.loss_spec(config, _Meta))
    state = steps.put_state(state)
    values = []
    for i in range(num_steps):
        state, m = steps.train(state, steps.put_batch(_batch(seed=i % 2)))
        values.append(float(m["loss"]))
    return values, state, m, train.merge_model(graphdef, state)


# ccnn (the solver on bfloat16-computed logits) stays in the default run; the supervised step
# alone adds four compilations (minutes on a loaded 2-core machine) for little more coverage.
@pytest.mark.parametrize("method", ["ccnn", pytest.param("full", marks=pytest.mark.slow)])
def test_bfloat16_training_tracks_float32(method):
    """bfloat16 activations, float32 everything else: the losses of 6 steps stay within
    0.01 + 1% of float32's (measured: within 1e-3) and fall as much."""
    config = _tiny_config(method)
    f32, _, _, _ = _losses_over_steps(config)
    config.dtype = "bfloat16"
    bf16, state, step_metrics, model = _losses_over_steps(config)
    print(method, "float32", np.round(f32, 4), "bfloat16", np.round(bf16, 4))
    assert model.down[0].conv1.dtype == jnp.bfloat16  # the setting reached the model
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    counts = ("confusion", "nonfinite")  # integer by design
    assert all(v.dtype == jnp.float32 for k, v in step_metrics.items() if k not in counts)
    np.testing.assert_allclose(bf16, f32, rtol=0.01, atol=0.01)
    assert bf16[-1] < 0.9 * bf16[0]


def test_sgd_is_momentum_sgd_with_coupled_weight_decay_and_step_decay():
    """optax's momentum accumulates raw gradients (Caffe's accumulates learning-rate-scaled
    ones): the same steps while the learning rate is constant."""
    config = _tiny_config("full")
    config.update(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.01)
    config.update(lr_decay_steps=2, lr_decay_factor=0.5, grad_clip_norm=0.0)
    tx = train.make_optimizer(config)
    w, g = jnp.ones(3), jnp.full(3, 0.5)
    state, velocity = tx.init(w), 0.0
    for step, lr in enumerate([0.1, 0.1, 0.05, 0.05]):
        updates, state = tx.update(g, state, w)
        velocity = 0.9 * velocity + (g + 0.01 * w)
        np.testing.assert_allclose(updates, -lr * velocity, rtol=1e-6, err_msg=f"step {step}")
        w = w + updates


def test_voc_paper_recipe_configs():
    from ccnn_jax.configs import voc

    c = voc.get_config("ccnn_vgg16")
    assert (c.method, c.dataset, c.model.name) == ("ccnn", voc.SBD, "vgg16_fcn32")
    assert (c.batch_size, tuple(c.image_size), c.num_steps) == (1, (512, 512), 40_000)
    assert (c.optimizer, c.momentum, c.weight_decay) == ("sgd", 0.99, 0.0)
    assert c.learning_rate == pytest.approx(1e-8 * 16 * 16)  # Caffe's summed loss -> our mean
    assert (c.lr_decay_steps, c.lr_decay_factor, c.pretrain.steps) == (10_000, 0.1, 0)
    assert (c.constraints.fg_lower, c.constraints.bg_lower, c.constraints.bg_upper) == (
        0.05,
        0.3,
        0.7,
    )
    assert (
        voc.get_config("ccnn_size,vgg16").to_dict() == voc.get_config("ccnn_size_vgg16").to_dict()
    )
    large = voc.get_config("mil,largefov")
    assert (large.model.name, large.learning_rate, large.num_steps) == (
        "vgg16_largefov",
        1e-6,
        35_000,
    )
    train.check_model_config(c)
    with pytest.raises(ValueError, match="one network"):
        voc.get_config("ccnn,vgg16,largefov")
