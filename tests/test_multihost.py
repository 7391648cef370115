"""Multi-host data parallel with two JAX processes on this machine (gloo CPU collectives).

Each process (``multihost_worker.py``, 2 CPU devices each) reads its own shard of the tiny
synthetic dataset; together they train, checkpoint, restore and evaluate. The result must equal
one process training on the same global batches, and a failing process must not leave the
other hanging. No pretraining here (``pretrain.steps = 0``): the stages are ordinary runs of
the same code path, and would triple the runtime.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from multihost_worker import EVAL_SPLIT, config_for_test

from ccnn_jax import losses, metrics, train
from ccnn_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
RUN_TIMEOUT_S = 420  # both processes together, on a loaded 2-core machine
# The survivor of a failure is ended within the heartbeat timeout (10 s) plus start-up; allow
# for the run up to the failure.
FAILURE_TIMEOUT_S = 300
# What the survivor says when its peer died: JAX's distributed service ending it, or (when it
# was inside a collective at the time) gloo's lost connection, reported by exit_on_error.
SERVICE_ERROR = (
    "heartbeat timeout|distributed service detected fatal errors|another task died"
    "|Gloo .* failed.*(Connection (reset|closed) by peer|Read error)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A prepared tiny dataset and a compilation cache both processes and the tests share."""
    root = tmp_path_factory.mktemp("multihost")
    data_dir = str(root / "tfds")
    pipeline.prepare("ccnn_synthetic/tiny", data_dir=data_dir)
    return {"data_dir": data_dir, "cache": str(root / "jax_cache"), "root": root}


def _launch(shared, workdir, out, *, fail_process=None):
    """Starts the processes; returns [(process, log path)] (stdout and stderr to the log)."""
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        CCNN_JAX_CACHE=str(shared["root"] / "ccnn_cache"),
        JAX_COMPILATION_CACHE_DIR=shared["cache"],
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    procs = []
    for i in range(NUM_PROCESSES):
        log = out / f"log_{i}.txt"
        cmd = [sys.executable, str(WORKER), "--process_id", str(i)]
        cmd += ["--num_processes", str(NUM_PROCESSES), "--port", str(port)]
        cmd += ["--workdir", str(workdir), "--data_dir", shared["data_dir"], "--out", str(out)]
        if i == fail_process:
            cmd.append("--fail_after_first_run")
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log))
    return procs


def _wait_all(procs, timeout_s):
    """Exit codes and wall times of every process; kills stragglers after ``timeout_s``, and
    then fails naming them with the tail of their output."""
    start, ends = time.time(), {}
    while len(ends) < len(procs) and time.time() - start < timeout_s:
        for i, (p, _) in enumerate(procs):
            if i not in ends and p.poll() is not None:
                ends[i] = time.time() - start
        time.sleep(0.2)
    stragglers = [i for i in range(len(procs)) if i not in ends]
    for i in stragglers:
        procs[i][0].send_signal(signal.SIGKILL)
        procs[i][0].wait()
    if stragglers:
        tails = "\n".join(f"--- process {i}:\n{_tail(procs[i][1])}" for i in stragglers)
        pytest.fail(f"processes {stragglers} still running after {timeout_s} s (killed)\n{tails}")
    return [p.returncode for p, _ in procs], [ends[i] for i in range(len(procs))]


def _tail(log, n=3000):
    return pathlib.Path(log).read_text()[-n:]


def _reference(config):
    """Final params and the evaluation confusion of ONE process (one device) stepping through
    the global batches of the two-process run: at every step, process 0's shard batch followed
    by process 1's (the order of ``make_array_from_process_local_data`` over the mesh)."""
    meta = pipeline.dataset_meta(config.dataset, data_dir=config.data_dir)
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((1,), ("data",), axis_types=auto, devices=jax.devices()[:1])
    graphdef, state, tx = train.create_train_state(config, meta.num_classes)
    steps = train.make_steps(graphdef, tx, losses.loss_spec(config, meta), mesh)
    state = steps.put_state(state)

    def loaders(split, **kwargs):
        return [
            pipeline.make_loader(
                config.dataset,
                split,
                data_dir=config.data_dir,
                image_size=tuple(config.image_size),
                seed=config.seed,
                shard=(i, NUM_PROCESSES),
                **kwargs,
            )
            for i in range(NUM_PROCESSES)
        ]

    train_loaders = loaders("train", batch_size=4, train=True, scale_range=config.scale_range)
    iterators = [iter(x) for x in train_loaders]
    for _ in range(config.num_steps):
        shards = [next(it) for it in iterators]
        batch = {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}
        state, _ = steps.train(state, steps.put_batch(batch))
    confusion = 0
    for loader in loaders(EVAL_SPLIT, batch_size=4, train=False):
        for batch in loader:
            confusion = confusion + np.asarray(steps.eval(state, steps.put_batch(batch)))
    params = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
    return params, confusion


# About 70 s on the 2-core machine (two runs of two processes and the one-process reference).
def test_two_processes_match_one_process_and_share_a_checkpoint(shared, tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    codes, seconds = _wait_all(_launch(shared, workdir, out), RUN_TIMEOUT_S)
    logs = "\n".join(_tail(out / f"log_{i}.txt") for i in range(NUM_PROCESSES))
    assert codes == [0, 0], logs
    print(f"two-process run: {max(seconds):.0f} s")

    # one checkpoint directory, written at steps 3 (then restored by both) and 6
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6]
    results = [np.load(out / f"process_{i}.npz") for i in range(NUM_PROCESSES)]
    for r in results:
        assert int(r["resumed_from"]) == 3
    params = [[r[f"arr_{j}"] for j in range(len(r.files) - 2)] for r in results]
    for a, b in zip(*params, strict=True):
        np.testing.assert_array_equal(a, b)  # replicated: identical on both processes

    ref_params, ref_confusion = _reference(config_for_test(shared["data_dir"]))
    assert len(ref_params) == len(params[0])
    for a, b in zip(params[0], ref_params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # evaluation over uneven shards (5 + 4 images): every image counted once
    np.testing.assert_array_equal(results[0]["confusion"], results[1]["confusion"])
    assert results[0]["confusion"].sum() == ref_confusion.sum() > 0
    assert metrics.mean_iou(results[0]["confusion"]) == pytest.approx(
        metrics.mean_iou(ref_confusion), abs=1e-6
    )


@pytest.mark.parametrize("fail_process", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_failing_process_ends_both(shared, tmp_path, fail_process):
    out = tmp_path / "out"
    out.mkdir()
    procs = _launch(shared, tmp_path / "run", out, fail_process=fail_process)
    codes, seconds = _wait_all(procs, FAILURE_TIMEOUT_S)
    failed_log = _tail(out / f"log_{fail_process}.txt", 6000)
    survivor = 1 - fail_process
    survivor_log = _tail(out / f"log_{survivor}.txt", 6000)
    print(f"exit codes {codes} after {seconds} s")
    # the failing process: its own error, exit status 1, at once
    assert codes[fail_process] == 1, failed_log
    assert f"injected failure in process {fail_process}" in failed_log
    assert f"ERROR in process {fail_process} of 2" in failed_log
    # the other one was waiting for it (a barrier or a collective): ended by the distributed
    # service once the failed process's heartbeats stopped (or the coordinator was gone)
    assert codes[survivor] != 0, survivor_log
    assert re.search(SERVICE_ERROR, survivor_log), survivor_log
    assert seconds[survivor] - seconds[fail_process] < 60
