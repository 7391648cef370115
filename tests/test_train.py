"""Training: loss decreases, no recompilation, 4-device sharding == 1 device, exact resume
(including from a corrupt latest checkpoint), the run's outputs."""

import importlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ccnn_jax import losses, run, train
from ccnn_jax.configs import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _get_config(config_string):
    return synthetic.get_config(config_string)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Reuse compiled steps across the runs of this module (same programs, same numerics)."""
    names = [
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    ]
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)


class _Meta:
    background = 0
    num_classes = 3
    class_names = ["background", "square", "bar"]


def _batch(b=4, size=16, seed=0):
    """Images with a bright square (class 1) and/or a dark bar (class 2) on grey."""
    rng = np.random.default_rng(seed)
    image = np.full((b, size, size, 3), 0.5, np.float32)
    mask = np.zeros((b, size, size), np.int32)
    tags = np.zeros((b, 3), np.float32)
    tags[:, 0] = 1
    for i in range(b):
        if i % 2 == 0:
            y, x = rng.integers(0, size - 6, 2)
            image[i, y : y + 6, x : x + 6] = 0.9
            mask[i, y : y + 6, x : x + 6] = 1
            tags[i, 1] = 1
        if i % 3 != 1:
            x = rng.integers(0, size - 3)
            image[i, :, x : x + 3] = 0.1
            mask[i, :, x : x + 3] = 2
            tags[i, 2] = 1
    size_hint = np.zeros_like(tags)
    return {
        "image": image,
        "mask": mask,
        "tags": tags,
        "size": size_hint,
        "valid": np.ones(b, np.float32),
    }


def _tiny_config(method):
    c = _get_config(f"{method},tiny")
    c.model.width, c.model.depth = 4, 1
    c.num_steps, c.warmup_steps, c.learning_rate = 20, 0, 1e-2
    return c


@pytest.mark.parametrize("method", ["ccnn", "full", "pretrain"])
def test_train_step_decreases_loss_without_recompiling(method):
    config = _tiny_config(method)
    graphdef, state, tx = train.create_train_state(config, _Meta.num_classes)
    steps = train.make_steps(graphdef, tx, losses.loss_spec(config, _Meta))
    state = steps.put_state(state)
    batch = steps.put_batch(_batch())
    loss_values = []
    for _ in range(8):
        state, m = steps.train(state, batch)
        loss_values.append(float(m["loss"]))
    assert loss_values[-1] < 0.9 * loss_values[0], loss_values
    assert int(state.step) == 8
    assert steps.train._cache_size() == 1  # one compilation for all steps
    if method == "ccnn":
        assert float(m["solver_converged"]) == 1.0


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    import test_train as t  # the working directory is tests/
    from ccnn_jax import losses, train
    assert jax.device_count() == 4, jax.devices()
    config = t._tiny_config("ccnn")
    out = {}
    for n in (4, 1):
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:n])
        graphdef, state, tx = train.create_train_state(config, t._Meta.num_classes)
        steps = train.make_steps(graphdef, tx, losses.loss_spec(config, t._Meta), mesh)
        state = steps.put_state(state)
        for i in range(2):
            state, m = steps.train(state, steps.put_batch(t._batch(b=8, seed=i)))
        assert len(m["loss"].sharding.device_set) == n
        out[n] = {"params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
                  "loss": float(m["loss"]), "confusion": np.asarray(m["confusion"]).tolist()}
    print("RESULT" + json.dumps(out))
    """
)


def test_sharded_step_on_4_devices_matches_single_device():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT / "tests",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    out = json.loads(line[len("RESULT") :])
    assert out["4"]["loss"] == pytest.approx(out["1"]["loss"], rel=1e-5)
    assert out["4"]["confusion"] == out["1"]["confusion"]
    for a, b in zip(out["4"]["params"], out["1"]["params"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from ccnn_jax.data import pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare("ccnn_synthetic/tiny", data_dir=path)
    return path


def _params(out):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(out.state.params))]


def test_resume_after_interruption_and_corrupt_checkpoint_gives_identical_params(
    data_dir, tmp_path, capsys
):
    config = _get_config("ccnn,tiny")
    config.data_dir = data_dir
    assert config.num_steps == 6 and config.checkpoint_every == 3
    full = run.train_and_evaluate(config, tmp_path / "a", progress=False)
    reference = _params(run.train(config, tmp_path / "a", progress=False))  # restored, no steps

    # outputs of the uninterrupted run
    a = tmp_path / "a"
    results = json.loads((a / "results.json").read_text())
    for key in (
        "method",
        "miou",
        "pixel_accuracy",
        "per_class_iou",
        "class_names",
        "steps",
        "seconds",
    ):
        assert key in results, key
    assert results["steps"] == 6 and results["method"] == "ccnn"
    assert 0.0 <= results["miou"] <= 1.0 and results["miou"] == full["miou"]
    assert len(results["per_class_iou"]) == len(results["class_names"]) == 9
    for name in ("predictions.png", "curves.png", "results.md"):
        assert (a / name).stat().st_size > 0, name
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert any(p.name.startswith("events.out.tfevents") for p in (a / "tensorboard").iterdir())

    # interrupted after 4 steps (checkpoints 3 and 4), latest checkpoint then corrupted
    b = tmp_path / "b"
    part = run.train(config, b, max_steps_this_run=4, progress=False)
    assert int(part.state.step) == 4
    for f in (b / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    capsys.readouterr()
    resumed = run.train(config, b, progress=False)
    log = capsys.readouterr().out
    assert "corrupt" in log and "step 4" in log
    assert resumed.resumed_from == 3
    assert (b / "corrupt_checkpoints" / "4").exists()
    for x, y in zip(_params(resumed), reference, strict=True):
        np.testing.assert_array_equal(x, y)
    # the logs of the resumed run continue where the checkpoint was taken
    rows = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]

    # rerunning a finished run resumes (no training) and reports the same result
    again = run.train_and_evaluate(config, a, progress=False)
    assert again["resumed_from"] == 6 and again["miou"] == full["miou"]


def test_bad_config_is_reported():
    config = _get_config("ccnn,tiny")
    config.batch_size = 0
    with pytest.raises(ValueError, match="batch_size"):
        run.train(config, "/nonexistent-never-created")
    with pytest.raises(ValueError, match="method"):
        _get_config("semi")


def test_warm_start_takes_the_source_model_with_a_fresh_optimizer(data_dir, tmp_path, capsys):
    source_config = _get_config("full,tiny")
    source_config.data_dir = data_dir
    source_config.num_steps = 3
    source = run.train(source_config, tmp_path / "source", progress=False)

    config = _get_config("ccnn,tiny")
    config.data_dir = data_dir
    config.num_steps = 1
    config.init_from = str(tmp_path / "source")
    capsys.readouterr()
    _, fresh, _ = train.create_train_state(config, 9)
    abstract = jax.eval_shape(lambda: fresh)
    warm = run.warm_start(fresh, abstract, config.init_from)
    assert "Warm start" in capsys.readouterr().out
    for x, y in zip(jax.tree.leaves(warm.params), _params(source), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    assert int(warm.step) == 0
    for x, y in zip(jax.tree.leaves(warm.opt_state), jax.tree.leaves(fresh.opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # a run with init_from trains from the source weights: one step away from them, not from init
    out = run.train(config, tmp_path / "warm", progress=False)
    moved = [
        np.abs(np.asarray(x) - y).max()
        for x, y in zip(jax.tree.leaves(jax.device_get(out.state.params)), _params(source))
    ]
    assert 0 < max(moved) < 0.1  # one lr-1e-3 Adam step (per-parameter update <= lr * ~1)

    # a source with another model is reported by name and its checkpoints stay where they are
    config.model.width = 8
    with pytest.raises(ValueError, match="config.init_from: the checkpoint"):
        run.train(config, tmp_path / "warm_wide", progress=False)
    assert (tmp_path / "source" / "checkpoints" / "3").exists()
    assert not (tmp_path / "source" / "corrupt_checkpoints").exists()
    config.model.width = source_config.model.width

    config.init_from = str(tmp_path / "no-such-run")
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        run.train(config, tmp_path / "warm2", progress=False)


@pytest.mark.parametrize("name", ["synthetic", "voc", "camvid"])
def test_dataset_configs_share_the_base_fields(name):
    module = importlib.import_module(f"ccnn_jax.configs.{name}")
    for method in ("ccnn", "ccnn_size", "mil", "full"):
        c = module.get_config(method)
        assert c.method == method and c.init_from is None
        assert 0 < c.constraints.bg_lower < c.constraints.bg_upper < 1
    with pytest.raises(ValueError, match="unknown options"):
        module.get_config("ccnn,bogus")


def test_config_hardness_reaches_the_latent_distribution():
    """config.hardness = 1000 gives a near one-hot P (hard latent labels); None gives s = 1."""
    config = _get_config("ccnn,tiny")
    logits = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    batch = {k: jax.numpy.asarray(v) for k, v in _batch(4, 16).items()}
    soft = losses.compute_loss(logits, batch, losses.loss_spec(config, _Meta))[1]["p"]
    config.hardness = 1000.0
    spec = losses.loss_spec(config, _Meta)
    assert spec.hardness == 1000.0
    hard = losses.compute_loss(logits, batch, spec)[1]["p"]
    assert float(np.mean(np.max(np.asarray(hard), axis=-1))) > 0.99
    assert float(np.mean(np.max(np.asarray(soft), axis=-1))) < 0.9
