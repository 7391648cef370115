"""Multi-process (multi-host) runs: start-up with timeouts, failing fast, lockstep iteration.

A multi-host run is one Python process per host (per GPU, or per TPU VM), all running the same
program: ``jax.distributed.initialize`` connects them to a coordinator (process 0), after which
``jax.devices()`` lists the devices of every process and the jitted steps of
:mod:`ccnn_jax.train` run SPMD over a ``("data",)`` mesh of all of them. Each process reads its
own shard of the data (``grain.ShardByJaxProcess``) and contributes ``batch_size /
process_count`` images to every global batch; orbax writes one checkpoint for all.

Three things make such a run end instead of hanging:

- :func:`initialize` sets explicit timeouts: a process that cannot reach the coordinator gives up
  after ``initialization_timeout_s``; a process that stops sending heartbeats (it crashed or
  was killed) is declared dead after ``heartbeat_timeout_s``, and the JAX distributed service
  then terminates every other process ("another task died").
- :func:`exit_on_error` ends a failing process at once (traceback, exit status 1) instead of
  letting it wait in JAX's shutdown barrier for peers that wait for it in a collective.
- :func:`lockstep` keeps processes whose data shards end at different batches stepping together
  (padding batches), since every step is a collective all processes must join.

CPU processes talk through gloo (:func:`initialize` selects it), which is how the tests run two
processes on one machine.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import jax
import numpy as np

T = TypeVar("T")
_barrier_count = itertools.count()

#: Defaults of :func:`initialize` (JAX's own defaults): a launch may wait minutes for its peers.
INITIALIZATION_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 100
SHUTDOWN_TIMEOUT_S = 300
#: How long processes wait at a barrier for process 0's one-off work (e.g. dataset preparation).
PREPARE_TIMEOUT_S = 24 * 3600
#: How long processes wait at a barrier for the slowest one to compile a step.
COMPILE_TIMEOUT_S = 3600


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout_s: int = INITIALIZATION_TIMEOUT_S,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
) -> None:
    """``jax.distributed.initialize`` with gloo CPU collectives and explicit timeouts.

    Call before any other JAX call. With ``coordinator_address``, ``num_processes`` and
    ``process_id`` all None, JAX detects the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes)
    or reads ``JAX_COORDINATOR_ADDRESS``; on one machine pass e.g. ``"127.0.0.1:<port>"``,
    ``2`` and ``0`` / ``1``.

    Args:
      coordinator_address: ``host:port`` of process 0, which runs the coordination service.
      num_processes: the number of processes in the run.
      process_id: this process's index in ``[0, num_processes)``.
      initialization_timeout_s: give up connecting to the coordinator after this long.
      heartbeat_timeout_s: a process silent for this long is dead; the others are terminated.
      shutdown_timeout_s: how long a finished process waits at exit for the others to finish.

    Raises:
      ValueError: ``num_processes`` / ``process_id`` given without the other, or out of range.
    """
    if (num_processes is None) != (process_id is None):
        raise ValueError(
            "num_processes and process_id go together: give both, or neither to let JAX "
            f"detect the cluster (got num_processes={num_processes}, process_id={process_id})"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=int(initialization_timeout_s),
        heartbeat_timeout_seconds=int(heartbeat_timeout_s),
        shutdown_timeout_seconds=int(shutdown_timeout_s),
    )


def is_multiprocess() -> bool:
    """True in a run of more than one JAX process (after :func:`initialize`)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """In a multi-process run, an exception ends this process at once with exit status 1.

    The traceback goes to stderr and the process leaves through ``os._exit``, skipping JAX's
    shutdown barrier (which would wait ``shutdown_timeout_s`` for peers that are themselves
    blocked in a collective waiting for this process). The peers are then terminated by the JAX
    distributed service: at once when this is process 0 (the coordinator), else once this
    process's heartbeats have been missing for ``heartbeat_timeout_s``. In a single-process run
    exceptions propagate as usual.
    """
    try:
        yield
    except BaseException as e:
        if not is_multiprocess() or (isinstance(e, SystemExit) and not e.code):
            raise
        print(
            f"ERROR in process {jax.process_index()} of {jax.process_count()}; ending it now "
            "(the other processes are terminated by the JAX distributed service):",
            file=sys.stderr,
        )
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def main_process_first(fn: Callable[[], T], name: str, *, timeout_s: int = PREPARE_TIMEOUT_S) -> T:
    """``fn()`` on process 0, then (after a barrier named after ``name``) on the others.

    For one-off work on shared storage, e.g. preparing a dataset: the others' call then finds it
    done. A single process just calls ``fn()``.
    """
    if not is_multiprocess():
        return fn()
    result = fn() if jax.process_index() == 0 else None
    barrier(name, timeout_s=timeout_s)
    return result if jax.process_index() == 0 else fn()


def barrier(name: str, *, timeout_s: int = PREPARE_TIMEOUT_S) -> None:
    """Waits until every process has reached the barrier named after ``name`` (through the
    distributed service, not a collective); a no-op in a single-process run."""
    if not is_multiprocess():
        return
    import orbax.checkpoint as ocp

    key = f"{name} #{next(_barrier_count)}"  # unique: every process counts its barriers alike
    ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=int(timeout_s * 1000))


def compile_together(jitted: Callable, *args, name: str, timeout_s: int = COMPILE_TIMEOUT_S):
    """Compiles ``jitted`` for ``args`` on every process, then meets the others at a barrier.

    Call before the first call of a step that runs collectives. XLA's gloo CPU collectives set up
    their communicator at the first collective with a fixed 30 s deadline for the peers' keys
    ("Gloo context initialization failed: DEADLINE_EXCEEDED"): a peer still compiling on a
    loaded machine would make the others fail. Compiled ahead and synchronised, only the
    execution's skew is left. ``jitted.lower(...).compile()`` fills jit's own cache, so the
    ordinary call that follows does not compile again. A no-op in a single-process run.
    """
    if not is_multiprocess():
        return
    jitted.lower(*args).compile()
    barrier(name, timeout_s=timeout_s)


def lockstep(batches: Iterable[dict], pad: Callable[[dict], dict]) -> Iterator[dict]:
    """The process-local ``batches`` until every process has run out of them.

    Each process's data shard may end at a different batch (e.g. 9 validation images on two
    processes), but every step is a collective that all processes must join; a process that has
    run out yields ``pad(last_batch)`` (an all-padding batch, ``valid = 0``) until all have.
    Costs one tiny all-gather per batch in a multi-process run; plain iteration otherwise.
    """
    if not is_multiprocess():
        yield from batches
        return
    from jax.experimental import multihost_utils

    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, None)
        more = multihost_utils.process_allgather(np.int32(batch is not None))
        if not np.any(more):
            return
        if batch is None:
            if last is None:
                raise ValueError(
                    f"process {jax.process_index()} has no batch of its own to pad from: its "
                    "data shard is empty (fewer examples than processes?)"
                )
            batch = pad(last)
        last = batch
        yield batch
