"""torchvision / timm checkpoints in their published layouts, and their forward passes in numpy.

The key names and shapes are built here from the torchvision definitions (VGG-16 cfg "D" with
its ``features`` indices; ResNet-50 bottlenecks [3, 4, 6, 3] with ``downsample.0/1`` and
``num_batches_tracked``) and timm's VGG filter (``classifier.0`` -> ``pre_logits.fc1`` reshaped
to (-1, C, 7, 7), ...), independently of ``ccnn_jax.models.pretrained``. The forward passes are
plain numpy (float64) on the torch-layout (NCHW, OIHW) arrays.
"""

import numpy as np
import safetensors.numpy

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


# ----------------------------------------------------------------------------- published layouts


def vgg16_torchvision_shapes(width=64, fc=4096, classes=1000):
    """torchvision vgg16 state dict: features.{i} built like ``make_layers`` (conv, relu / pool)."""
    shapes, index, c_in = {}, 0, 3
    for v in VGG16_CFG:
        if v == "M":
            index += 1
            continue
        c = v * width // 64
        shapes[f"features.{index}.weight"] = (c, c_in, 3, 3)
        shapes[f"features.{index}.bias"] = (c,)
        index, c_in = index + 2, c
    shapes.update(
        {
            "classifier.0.weight": (fc, c_in * 7 * 7),
            "classifier.0.bias": (fc,),
            "classifier.3.weight": (fc, fc),
            "classifier.3.bias": (fc,),
            "classifier.6.weight": (classes, fc),
            "classifier.6.bias": (classes,),
        }
    )
    return shapes


TIMM_VGG_RENAMES = {
    "classifier.0": "pre_logits.fc1",
    "classifier.3": "pre_logits.fc2",
    "classifier.6": "head.fc",
}


def vgg16_timm_entry(key, shape, channels):
    """timm's vgg ``_filter_fn`` on one entry: renamed, fc1 (-1, C, 7, 7), fc2 (-1, F, 1, 1)."""
    if key == "classifier.0.weight":
        shape = (shape[0], channels, 7, 7)
    if key == "classifier.3.weight":
        shape = (*shape, 1, 1)
    module, _, name = key.rpartition(".")
    return f"{TIMM_VGG_RENAMES.get(module, module)}.{name}", shape


def vgg16_timm_shapes(shapes):
    c = shapes["features.28.weight"][0]
    return dict(vgg16_timm_entry(k, s, c) for k, s in shapes.items())


def vgg16_timm_tensors(tensors):
    c = tensors["features.28.weight"].shape[0]
    out = {}
    for k, v in tensors.items():
        key, shape = vgg16_timm_entry(k, v.shape, c)
        out[key] = v.reshape(shape)
    return out


def resnet50_torchvision_shapes(width=64, classes=1000):
    """torchvision resnet50 state dict (with BatchNorm's num_batches_tracked)."""
    shapes = {"conv1.weight": (width, 3, 7, 7)}

    def bn(key, c):
        names = ("weight", "bias", "running_mean", "running_var")
        shapes.update({f"{key}.{n}": (c,) for n in names})
        shapes[f"{key}.num_batches_tracked"] = ()

    bn("bn1", width)
    inplanes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2**stage
        for b in range(blocks):
            p = f"layer{stage + 1}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    shapes.update({"fc.weight": (classes, inplanes), "fc.bias": (classes,)})
    return shapes


def fabricate(shapes, seed=0):
    """Random float32 tensors (He-scaled weights, positive variances, int64 counters)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(1000, np.int64)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith(".weight") and len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            out[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif key.endswith(".weight"):  # 1-D: a BatchNorm scale
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def write(tmp_path, tensors, name="weights.safetensors"):
    path = tmp_path / name
    safetensors.numpy.save_file(tensors, str(path))
    return path


# ----------------------------------------------------------------------------- numpy reference


def np_conv(x, w, b=None, *, stride=1, pad=0, dilation=1):
    """torch Conv2d on NCHW float64: weight (O, I, kh, kw)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    _, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = (h - (kh - 1) * dilation - 1) // stride + 1
    wo = (wd - (kw - 1) * dilation - 1) // stride + 1
    out = np.zeros((x.shape[0], o, ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i * dilation :: stride, j * dilation :: stride][:, :, :ho, :wo]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
    return out if b is None else out + b[None, :, None, None]


def np_max_pool(x, k, stride, pad=0):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    windows = [x[:, :, i::stride, j::stride][:, :, :ho, :wo] for i in range(k) for j in range(k)]
    return np.max(windows, axis=0)


def np_bn(x, t, key):
    scale = t[f"{key}.weight"] / np.sqrt(t[f"{key}.running_var"].astype(np.float64) + 1e-5)
    return (x - t[f"{key}.running_mean"][None, :, None, None]) * scale[None, :, None, None] + t[
        f"{key}.bias"
    ][None, :, None, None]


def relu(x):
    return np.maximum(x, 0)


def to_nchw(images_nhwc):
    return ((np.asarray(images_nhwc, np.float64) - MEAN) / STD).transpose(0, 3, 1, 2)


def np_vgg16_logits(t, images):
    """torchvision VGG-16 forward on 224x224 (pool5 7x7, so avgpool(7, 7) is the identity)."""
    x, index = to_nchw(images), 0
    for v in VGG16_CFG:
        if v == "M":
            x, index = np_max_pool(x, 2, 2), index + 1
        else:
            x = relu(np_conv(x, t[f"features.{index}.weight"], t[f"features.{index}.bias"], pad=1))
            index += 2
    h = x.reshape(x.shape[0], -1)  # torch.flatten: (C, H, W) order
    h = relu(h @ t["classifier.0.weight"].T + t["classifier.0.bias"])
    h = relu(h @ t["classifier.3.weight"].T + t["classifier.3.bias"])
    return h @ t["classifier.6.weight"].T + t["classifier.6.bias"]


def np_bottleneck(x, t, p, stride, dilation):
    y = relu(np_bn(np_conv(x, t[f"{p}.conv1.weight"]), t, f"{p}.bn1"))
    y = relu(
        np_bn(
            np_conv(y, t[f"{p}.conv2.weight"], stride=stride, pad=dilation, dilation=dilation),
            t,
            f"{p}.bn2",
        )
    )
    y = np_bn(np_conv(y, t[f"{p}.conv3.weight"]), t, f"{p}.bn3")
    if f"{p}.downsample.0.weight" in t:
        x = np_bn(np_conv(x, t[f"{p}.downsample.0.weight"], stride=stride), t, f"{p}.downsample.1")
    return relu(y + x)


def np_resnet50_stem(t, images):
    x = relu(np_bn(np_conv(to_nchw(images), t["conv1.weight"], stride=2, pad=3), t, "bn1"))
    return np_max_pool(x, 3, 2, pad=1)


def np_resnet50_features(t, images, replace_stride_with_dilation):
    """torchvision ``ResNet._make_layer`` semantics for strides and dilations."""
    x, dilation = np_resnet50_stem(t, images), 1
    for stage, blocks in enumerate((3, 4, 6, 3)):
        stride, previous = (1 if stage == 0 else 2), dilation
        if stage > 0 and replace_stride_with_dilation[stage - 1]:
            dilation, stride = dilation * stride, 1
        for b in range(blocks):
            x = np_bottleneck(
                x,
                t,
                f"layer{stage + 1}.{b}",
                stride if b == 0 else 1,
                previous if b == 0 else dilation,
            )
    return x


def assert_close(actual, expected, tol=2e-4):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-3)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)
