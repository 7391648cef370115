"""Faults injected as a user meets them, and what survives them.

Training runs are subprocesses of ``experiments/train.py`` on the tiny synthetic config (one
dataset prepared per session, one XLA cache): two runs started at once in one workdir, SIGTERM
and SIGINT mid-run, a torn ``metrics.jsonl`` line, a diverging learning rate, a rerun with
another config, a mistyped ``init_from``, bad config values. Dataset faults use the fake VOC
downloads of ``fakes.py``. Each test asserts the error a user sees (one line, naming what to
fix) and that the files of earlier work are unchanged.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import warnings

import fakes
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ccnn_jax import checkpoint, configs, losses, run, train
from ccnn_jax.configs import synthetic
from ccnn_jax.data import checks, voc

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The tiny synthetic config without pretraining (``scratch``): a fault test's run starts at once.
CONFIG = f"{ROOT / 'ccnn_jax' / 'configs' / 'synthetic.py'}:ccnn,tiny,scratch"
#: The run most tests share: 40 tiny steps, a log row per step, a checkpoint only at the end
#: (so a mid-run checkpoint can only come from a signal).
RUN_FLAGS = ("--config.num_steps=40", "--config.log_every=1", "--config.checkpoint_every=100")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from ccnn_jax.data import pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare("ccnn_synthetic/tiny", data_dir=path)
    return path


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for every training subprocess of the session."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _command(workdir, data_dir, xla_cache, *flags, config=CONFIG):
    return [
        sys.executable,
        str(ROOT / "experiments" / "train.py"),
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        f"--jax_cache_dir={xla_cache}",
        *flags,
    ]


def _start(*args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        _command(*args, **kwargs),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    pid: int

    @property
    def error(self) -> str:
        """The last line of stderr (where the scripts print their one-line error)."""
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def _wait(proc: subprocess.Popen, t0: float, timeout: float = 1800) -> Finished:
    """The finished ``proc`` (killed if it outlives ``timeout``; generous for loaded machines)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return Finished(proc.returncode, stdout, stderr, time.time() - t0, proc.pid)


def _train(*args, **kwargs) -> Finished:
    t0 = time.time()
    return _wait(_start(*args, **kwargs), t0)


def _tree(path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file and folder under ``path``: a fingerprint of a workdir."""
    path = pathlib.Path(path)
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _state_arrays(workdir, step: int) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():  # "sharding info not provided": numpy arrays are wanted
        warnings.simplefilter("ignore", UserWarning)
        state = ocp.PyTreeCheckpointer().restore(
            pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
        )
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _metric_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def _wait_for_step(proc: subprocess.Popen, workdir, after: int, timeout: float = 300) -> None:
    """Returns once ``workdir``'s metrics log a step > ``after`` (the run is mid-training)."""
    t0 = time.time()
    while max(_metric_steps(workdir), default=0) <= after:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the run logged no step in time"
        time.sleep(0.02)


# ------------------------------------------------------------------------ two runs, one workdir


@dataclasses.dataclass
class Race:
    workdir: pathlib.Path
    winner: Finished
    loser: Finished
    stale_pid: int


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir, xla_cache) -> Race:
    """Two runs of one config started at once in a workdir holding a stale lock file."""
    workdir = tmp_path_factory.mktemp("runs") / "race"
    workdir.mkdir()
    stale_pid = _dead_pid()
    record = {"pid": stale_pid, "host": socket.gethostname(), "started": "earlier"}
    (workdir / checkpoint.LOCK_FILE).write_text(json.dumps(record))
    t0 = time.time()
    procs = [_start(workdir, data_dir, xla_cache, *RUN_FLAGS) for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # each exit timed on its own
        done = list(pool.map(lambda p: _wait(p, t0), procs))
    winner, loser = sorted(done, key=lambda f: f.returncode)
    return Race(workdir, winner, loser, stale_pid)


def test_two_runs_at_once_one_refuses_within_seconds_the_other_finishes(finished_run):
    race = finished_run
    assert race.winner.returncode == 0, race.winner.stderr[-3000:]
    assert race.loser.returncode == 1, race.loser.stderr[-3000:]
    assert f"is in use by pid {race.winner.pid} on host" in race.loser.error
    assert race.loser.seconds < min(race.winner.seconds, 60)
    # the stale lock of a dead process was taken over, and released at the end
    assert f"taking over the stale lock of pid {race.stale_pid}" in race.winner.stdout
    assert not (race.workdir / checkpoint.LOCK_FILE).exists()
    assert _metric_steps(race.workdir) == list(range(1, 41))  # one writer, no interleaving
    assert json.loads((race.workdir / "results.json").read_text())["steps"] == 40


# ----------------------------------------------------------------------------- signals


def test_sigterm_and_sigint_save_the_current_step_and_the_rerun_resumes_bit_identically(
    finished_run, tmp_path, data_dir, xla_cache
):
    workdir = tmp_path / "preempted"
    stopped_at = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        t0 = time.time()
        proc = _start(workdir, data_dir, xla_cache, *RUN_FLAGS)
        _wait_for_step(proc, workdir, after=max(stopped_at, default=0))
        t_signal = time.time()
        proc.send_signal(sig)
        done = _wait(proc, t0, timeout=60)
        assert time.time() - t_signal < 60
        assert done.returncode == 128 + sig, done.stderr[-3000:]
        assert f"stopped by {sig.name} after step" in done.error
        step = int(done.error.split("after step ")[1].split(",")[0])
        assert max(stopped_at, default=0) < step < 40
        assert (workdir / "checkpoints" / str(step)).is_dir()  # saved although not periodic
        assert not (workdir / "results.json").exists()
        stopped_at.append(step)
        # a kill while appending a metrics row leaves a torn last line; resuming drops it
        with (workdir / "metrics.jsonl").open("a") as f:
            f.write('{"step": 39, "train/lo')

    resumed = _train(workdir, data_dir, xla_cache, *RUN_FLAGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dropped the torn last line" in resumed.stdout
    assert _metric_steps(workdir) == list(range(1, 41))
    for got, want in zip(
        _state_arrays(workdir, 40), _state_arrays(finished_run.workdir, 40), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    results = [
        json.loads((w / "results.json").read_text()) for w in (workdir, finished_run.workdir)
    ]
    assert results[0]["confusion"] == results[1]["confusion"]
    assert results[0]["resumed_from"] == stopped_at[-1]


# ----------------------------------------------------------------------------- divergence


def test_diverging_run_stops_and_keeps_the_good_checkpoints_and_results(
    tmp_path, data_dir, xla_cache
):
    workdir = tmp_path / "diverging"
    flags = ("--config.learning_rate=1e20", "--config.checkpoint_every=1", "--config.log_every=1")
    first = _train(workdir, data_dir, xla_cache, *flags, "--config.num_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]  # lr 0 at step 1, then huge but finite
    before = _tree(workdir / "checkpoints")
    results = (workdir / "results.json").read_bytes()

    extended = _train(workdir, data_dir, xla_cache, *flags, "--config.num_steps=6")
    assert extended.returncode == 1, extended.stderr[-3000:]
    assert extended.error.startswith("error: step 3: non-finite loss"), extended.error
    assert "latest checkpoint: step 2" in extended.error
    assert "Traceback" not in extended.stderr
    assert _tree(workdir / "checkpoints") == before
    assert (workdir / "results.json").read_bytes() == results
    assert max(_metric_steps(workdir)) == 2
    for leaf in _state_arrays(workdir, 2):
        assert np.all(np.isfinite(leaf))


def test_a_nonfinite_step_is_not_applied():
    config = synthetic.get_config("full,tiny,scratch")
    config.model.depth, config.model.output_stride = 1, 1  # the smallest net: a quick compile
    graphdef, state, tx = train.create_train_state(config, 3)
    meta = type("Meta", (), {"background": 0, "num_classes": 3})
    steps = train.make_steps(graphdef, tx, losses.loss_spec(config, meta))
    state = steps.put_state(state)
    before = [np.asarray(x) for x in jax.tree.leaves(state)]
    batch = {
        "image": np.full((8, 8, 8, 3), np.nan, np.float32),
        "mask": np.zeros((8, 8, 8), np.int32),
        "tags": np.ones((8, 3), np.float32),
        "size": np.zeros((8, 3), np.float32),
        "valid": np.ones(8, np.float32),
    }
    new_state, out = steps.train(state, steps.put_batch(batch))
    assert train.nonfinite_names(out["nonfinite"])[:2] == ["loss", "grads"]
    for got, want in zip(jax.tree.leaves(new_state), before, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------- another config


def test_rerun_with_another_config_is_refused_and_leaves_the_run_untouched(
    finished_run, data_dir, xla_cache
):
    workdir = finished_run.workdir
    before = _tree(workdir)
    mil = CONFIG.replace(":ccnn,", ":mil,")
    assert mil != CONFIG
    refused = _train(workdir, data_dir, xla_cache, *RUN_FLAGS, "--config.model.width=8", config=mil)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert refused.stderr.strip() == refused.error  # one line
    assert "was made with another config" in refused.error
    assert "method 'ccnn' -> 'mil'" in refused.error and "model.width 4 -> 8" in refused.error
    assert _tree(workdir) == before


def test_fields_that_may_differ_are_taken_and_shape_mismatches_are_named(
    finished_run, data_dir, tmp_path, capsys
):
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run.workdir, workdir)
    config = synthetic.get_config("ccnn,tiny,scratch")
    config.data_dir = data_dir
    config.num_steps, config.log_every, config.checkpoint_every = 40, 5, 7
    out = run.train(config, workdir, progress=False)  # finished: restores, trains nothing
    assert out.resumed_from == 40
    assert "log_every 1 -> 5" in capsys.readouterr().out

    # a workdir without a config record (made before records existed) and another width: the
    # checkpoint's shapes are compared first, so the error says so and moves nothing aside
    (workdir / checkpoint.CONFIG_RECORD).unlink()
    config.model.width = 8
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not fit") as e:
        run.train(config, workdir, progress=False)
    assert "corrupt" not in str(e.value)
    assert "params/bottleneck/conv1/kernel/value is float32[3, 3, 8, 16] there, " in str(e.value)
    assert (workdir / "checkpoints" / "40").is_dir()
    assert not (workdir / "corrupt_checkpoints").exists()


# ----------------------------------------------------------------------------- init_from


def test_init_from_source_is_read_only_and_a_mistyped_one_creates_nothing(
    finished_run, tmp_path, data_dir, xla_cache
):
    source = tmp_path / "source"
    shutil.copytree(finished_run.workdir, source)
    leftover = source / "checkpoints" / "41.orbax-checkpoint-tmp-1700000000"
    leftover.mkdir()  # a save in progress (or interrupted) in the source run
    before = _tree(source)
    config = synthetic.get_config("ccnn,tiny,scratch")
    _, fresh, _ = train.create_train_state(config, 9)
    warm = run.warm_start(fresh, jax.eval_shape(lambda: fresh), str(source))
    assert int(warm.step) == 0
    assert _tree(source) == before

    typo = tmp_path / "no" / "such" / "run"
    refused = _train(
        tmp_path / "warm", data_dir, xla_cache, f"--config.init_from={typo}", *RUN_FLAGS
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.error.startswith("error: config.init_from: no checkpoint under")
    assert not (tmp_path / "no").exists()


# ----------------------------------------------------------------------------- bad settings

BAD_SETTINGS = {
    "learning_rate": -1.0,
    "hardness": -3.0,
    "solver.max_iter": 0,
    "solver.tol": -1e-4,
    "solver.method": "lbfgs",
    "method": "semi",
    "batch_size": 0,
    "eval_batch_size": -8,
    "num_steps": 0,
    "weight_decay": float("nan"),
    "final_lr_fraction": 2.0,
    "grad_clip_norm": -1.0,
    "constraints.fg_lower": 1.5,
    "constraints.fg_slack": -2.0,
    "mil_weight": -0.5,
    "model.width": 0,
    "model.norm": "instance",
    "model.output_stride": 3,
    "image_size": (30, 32),
    "train_split": "train[:abc]",
    "dataset": "ccnn_synthetic/huge",
    "log_every": 0,
    "checkpoint_every": -1,
    "worker_count": -1,
    "init_from": "",
    "scale_range": (1.2, 0.8),
    "model.classifier": "yes",
    "pretrain.steps": -1,
    "pretrain.learning_rate": float("inf"),
    "pretrain.batch_size": 0,
    "pretrain.image_size": (32, 30),
    "pretrain.scale_range": (0.0, 1.0),
    "pretrain.workdir": "",
    "model.name": "vgg19",
    "model.pretrained": "/weights/vgg16.safetensors",  # the UNet has no ImageNet weights
    "model.pretrained_layout": "caffe",
    "model.dropout_rate": 1.5,
    "dtype": "float16",
    "optimizer": "adam",
    "momentum": -0.9,
    "lr_decay_steps": 0,
    "lr_decay_factor": 0.0,
}


@pytest.mark.parametrize("field", sorted(BAD_SETTINGS))
def test_each_bad_setting_gets_a_one_line_error_naming_it(field):
    config = synthetic.get_config("ccnn,tiny,scratch")
    node, leaf = config, field
    if "." in field:
        section, leaf = field.split(".")
        node = config[section]
    with node.ignore_type():
        node[leaf] = BAD_SETTINGS[field]
    with pytest.raises(configs.ConfigError) as e:
        configs.validate(config)
    message = str(e.value)
    assert message.startswith(f"config.{field} must be "), message
    assert "\n" not in message


def test_bounds_in_the_wrong_order_are_named():
    config = synthetic.get_config("ccnn,tiny,scratch")
    config.constraints.bg_lower = 0.99
    with pytest.raises(configs.ConfigError, match=r"constraints.bg_lower must be <= config"):
        configs.validate(config)
    with pytest.raises(configs.ConfigError, match="divisible by the 3 devices"):
        configs.validate(synthetic.get_config("ccnn,tiny,scratch"), num_devices=3)


def test_nan_hardness_and_pretraining_without_its_classifier_are_named():
    config = synthetic.get_config("ccnn,tiny,scratch")
    config.hardness = float("nan")
    with pytest.raises(configs.ConfigError, match=r"^config.hardness must be a finite number"):
        configs.validate(config)
    config = synthetic.get_config("ccnn,tiny")  # pretrains: the model needs its classifier
    config.model.classifier = False
    with pytest.raises(configs.ConfigError, match=r"^config.model.classifier must be True"):
        configs.validate(config)
    config.init_from = "/some/run"  # a warm start instead: no pretraining, no classifier needed
    configs.validate(config)
    config = synthetic.get_config("pretrain,tiny")
    config.model.classifier = False
    with pytest.raises(configs.ConfigError, match=r"^config.model.classifier must be True"):
        configs.validate(config)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.lerning_rate=0.1", "--config.lerning_rate: no such config field"),
        ("--config.learning_rate=-1", "config.learning_rate must be a finite number in [0, inf]"),
        ("--config=ccnn_jax/configs/synthetic.py:ccnn,bogus", "unknown options ['bogus']"),
    ],
)
def test_the_cli_prints_one_line_for_a_config_error(flag, message, tmp_path, data_dir, xla_cache):
    done = _train(tmp_path / "w", data_dir, xla_cache, flag)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [done.error], done.stderr[-3000:]
    assert message in done.error and done.error.startswith("error: ")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- dataset files


def _prepare_voc(manual_dir, data_dir):
    builder = voc.VocSegmentation(config="voc2012", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )


def test_a_corrupt_voc_tar_is_named(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=True)
    tar = tmp_path / "manual" / fakes.VOC_TAR
    tar.write_bytes(b"<html>404 Not Found</html>\n" * 50)  # a failed download saved as the tar
    with pytest.raises(checks.BadInputError) as e:
        _prepare_voc(tmp_path / "manual", tmp_path / "data")
    assert str(e.value).startswith(f"cannot read the archive {tar}: ReadError('invalid header')")
    assert "\n" not in str(e.value)


def test_a_truncated_voc_tar_is_named(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=True)
    tar = tmp_path / "manual" / fakes.VOC_TAR
    with tarfile.open(tar) as f:
        last = max(f.getmembers(), key=lambda m: m.offset_data)
    tar.write_bytes(tar.read_bytes()[: last.offset_data + 10])
    with pytest.raises(checks.BadInputError, match=str(tar)):
        _prepare_voc(tmp_path / "manual", tmp_path / "data")


def _voc_list(manual_dir, split="train") -> pathlib.Path:
    return manual_dir / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / f"{split}.txt"


def test_a_duplicate_voc_id_is_named_with_its_list_and_lines(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=False)
    ids = _voc_list(tmp_path / "manual")
    ids.write_text(ids.read_text() + fakes.VOC_TRAIN[0] + "\n")
    n = len(fakes.VOC_TRAIN) + 1
    match = f"train.txt: line {n}: id '{fakes.VOC_TRAIN[0]}' is listed twice .first on line 1."
    with pytest.raises(checks.BadInputError, match=match):
        _prepare_voc(tmp_path / "manual", tmp_path / "data")


def test_a_path_as_voc_id_cannot_read_outside_manual_dir(tmp_path):
    manual = tmp_path / "manual"
    expected = fakes.write_voc(manual, as_tar=False)
    images = manual / "VOCdevkit" / "VOC2012" / "JPEGImages"
    masks = manual / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    stem = fakes.VOC_TRAIN[0]
    shutil.copy(images / f"{stem}.jpg", tmp_path / "outside.jpg")  # a readable file outside
    shutil.copy(masks / f"{stem}.png", tmp_path / "outside.png")
    ids = _voc_list(manual, "val")
    ids.write_text(ids.read_text() + "../../../../outside\n")
    with pytest.raises(checks.BadInputError, match=r"val.txt: line \d+: '../../../../outside'"):
        _prepare_voc(manual, tmp_path / "data")
    assert expected  # the fake itself was fine


# ----------------------------------------------------------------------------- solver arguments


def _solver_problem():
    from ccnn_jax import constraints

    log_q = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (8, 8, 4)))
    return log_q, constraints.from_tags(np.array([True, True, False, False]))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hardness=float("nan")), "hardness must be finite and > 0"),
        (dict(tol=-1e-4), "tol must be >= 0"),
        (dict(max_iter=0), "max_iter must be an integer >= 1"),
        (dict(max_lambda=0.0), "max_lambda must be finite and > 0"),
        (dict(log_q="list"), "log_q must be a numpy or jax array"),
        (dict(cons="no rows"), "C = 0 rows"),
        (dict(cons="nan weights"), "weights must be finite"),
    ],
)
def test_each_bad_solver_argument_gets_a_one_line_error_naming_it(change, message):
    from ccnn_jax import LinearConstraints, solve

    log_q, cons = _solver_problem()
    kwargs = dict(change)
    if kwargs.get("log_q") == "list":
        log_q = np.asarray(log_q).tolist()
        del kwargs["log_q"]
    if kwargs.get("cons") == "no rows":
        cons = LinearConstraints(np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.ones(4, bool))
        del kwargs["cons"]
    with pytest.raises(ValueError, match=message) as e:
        if kwargs.get("cons") == "nan weights":
            weights = np.ones((cons.a.shape[0], 8, 8), np.float32)
            weights[0, 0, 0] = np.nan
            del kwargs["cons"]
            cons = LinearConstraints(cons.a, cons.b, cons.beta, cons.mask, weights)
        solve(log_q, cons, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fault", ["nan log_q", "nan hardness", "negative beta", "nan beta", "no label", "nan b"]
)
def test_invalid_solver_inputs_under_jit_are_never_reported_as_a_success(fault):
    """Traced under ``jit`` nothing can raise: the solve reports feasible = converged = False."""
    from ccnn_jax import LinearConstraints, solve, solve_batch

    log_q, cons = _solver_problem()
    lq, b, beta, mask, hardness = log_q, cons.b, cons.beta, cons.mask, 1.0
    if fault == "nan log_q":
        lq = log_q.at[2, 3, 1].set(jnp.nan)
    elif fault == "nan hardness":
        hardness = float("nan")
    elif fault == "negative beta":
        beta = beta.at[0].set(-1.0)
    elif fault == "nan beta":
        beta = beta.at[0].set(jnp.nan)
    elif fault == "no label":
        mask = jnp.zeros_like(mask)
    elif fault == "nan b":
        b = b.at[0].set(jnp.nan)

    @jax.jit
    def solve_traced(lq, b, beta, mask, hardness):
        c = LinearConstraints(cons.a, b, beta, mask)
        one = solve(lq, c, hardness=hardness)
        batch = solve_batch(lq[None], jax.tree.map(lambda x: x[None], c), hardness=hardness)
        return one.info, batch.info

    for info in solve_traced(lq, b, beta, mask, hardness):
        assert not np.any(info.feasible), fault
        assert not np.any(info.converged), fault
    ok, _ = solve_traced(log_q, cons.b, cons.beta, cons.mask, 1.0)
    assert bool(ok.feasible) and bool(ok.converged)
