"""A run's workdir on disk: orbax checkpoints, the config record and the one-process lock.

Each step directory under ``<workdir>/checkpoints`` holds three items, written atomically by
orbax (a temporary directory renamed on commit):

- ``state``: the train-state pytree (``StandardSave``),
- ``data``: the grain iterator position, one JSON file per JAX process
  (``grain.checkpoint.CheckpointSave``), so a resumed run sees the same batches,
- ``meta``: JSON (step, accumulated training seconds, ...).

A checkpoint that fails to restore is reported, moved to ``<workdir>/corrupt_checkpoints/`` and
the previous one is used; a checkpoint whose array shapes do not fit the run's state is refused
up front (:class:`CheckpointMismatchError`), never mistaken for a corrupt one.

:func:`check_config_record` keeps ``<workdir>/config.json``, the config the workdir was made
with, and refuses a rerun with another one; :func:`workdir_lock` keeps a second process out.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ccnn_jax import reporting

#: The config record and the lock file in a workdir.
CONFIG_RECORD = "config.json"
LOCK_FILE = "lock"


class WorkdirError(RuntimeError):
    """A workdir cannot be used as asked (the message says why and what to do)."""


class CheckpointError(WorkdirError):
    """No checkpoint in the directory could be restored."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's arrays do not fit the run's state (another model, dataset or optimizer)."""


class ConfigMismatchError(WorkdirError):
    """The workdir was made with another config."""


class WorkdirBusyError(WorkdirError):
    """Another live process holds the workdir's lock."""


class Checkpointer:
    """Periodic + final checkpoints in ``directory`` (keeps the latest ``max_to_keep``).

    ``read_only=True`` opens another run's checkpoints (a warm start): nothing is created,
    cleaned up, moved or saved there, and a directory that does not exist stays absent.
    """

    def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 3, read_only=False):
        self.directory = epath.Path(directory)
        self.max_to_keep = max_to_keep
        self.read_only = read_only
        self._manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not self.read_only,
            create=not self.read_only,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, state: Any, data_iterator: Any, meta: dict, *, force: bool = False
    ) -> None:
        """Saves (state, iterator position, meta) as step ``step`` (blocking, atomic)."""
        if self.read_only:
            raise WorkdirError(f"{self.directory} was opened read-only; not saving step {step}")
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        self._manager.wait_until_finished()

    def restore_latest(
        self, abstract_state: Any, data_iterator: Any | None, *, read_only: bool = False
    ) -> tuple[Any, dict] | None:
        """Restores the newest readable checkpoint into ``data_iterator``; None if there is none.

        ``data_iterator=None`` restores the state and meta only (e.g. to warm-start another run);
        ``read_only=True`` (or a read-only Checkpointer) never moves unreadable checkpoints aside.

        Returns ``(state, meta)``. Unreadable checkpoints are logged as errors and moved aside;
        if every checkpoint is unreadable a :class:`CheckpointError` names the directory. A
        checkpoint whose array shapes differ from ``abstract_state`` raises
        :class:`CheckpointMismatchError` listing the differences (before any restore attempt).
        """
        read_only = read_only or self.read_only
        steps = self.all_steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            self._check_shapes(step, abstract_state)
            try:
                items = {
                    "state": ocp.args.StandardRestore(abstract_state),
                    "meta": ocp.args.JsonRestore(),
                }
                if data_iterator is not None:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
                meta = dict(restored["meta"])
                if int(meta.get("step", -1)) != step:
                    raise ValueError(f"meta step {meta.get('step')} != directory step {step}")
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                msg = f"checkpoint step {step} in {self.directory} is corrupt or unreadable: {e!r}"
                logging.error("%s", msg)
                print(f"WARNING: {msg}; trying the previous checkpoint", flush=True)
                failures.append(step)
                continue
            if failures and not read_only:
                self._move_aside(failures)
                print(f"Resumed from the previous checkpoint, step {step}.", flush=True)
            return restored["state"], meta
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored (steps {steps}); move the "
            "directory away to start from scratch"
        )

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointMismatchError when step's stored arrays do not fit the state's
        shapes; an unreadable shape record is left to the restore (which reports corruption)."""
        stored = _stored_shapes(self.directory / str(step) / "state")
        if stored is None:
            return
        differences = _shape_differences(stored, _shapes_by_path(abstract_state))
        if differences:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not fit this run's state "
                f"(another model, dataset or optimizer config): {_some(differences)}; use the "
                "config the workdir was made with, or another workdir"
            )

    def _move_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            corrupt_dir = self.directory.parent / "corrupt_checkpoints"
            corrupt_dir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                src = self.directory / str(step)
                dst = corrupt_dir / str(step)
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.move(str(src), str(dst))
                print(f"Moved the unreadable checkpoint to {dst}.", flush=True)
        self._manager.close()
        self._manager = self._make_manager()

    def close(self) -> None:
        self._manager.close()


# ----------------------------------------------------------------------------- array shapes


def _stored_shapes(item_dir: epath.Path) -> dict[str, tuple] | None:
    """(shape, dtype) by path of the arrays stored in ``item_dir``; None if unreadable."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return _shapes_by_path(handler.metadata(item_dir).tree)
    except Exception:  # noqa: BLE001 - a missing or corrupt record: the restore will report it
        return None
    finally:
        handler.close()


def _shapes_by_path(tree: Any) -> dict[str, tuple]:
    """``{"params/conv/kernel/value": ((3, 3, 8, 16), "float32"), ...}`` for a pytree of arrays,
    shape structs or orbax array metadata (the same path spelling for all three)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # stored as its key data
            leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        out["/".join(str(k) for k in keys)] = (tuple(leaf.shape), str(leaf.dtype))
    return out


def _shape_differences(stored: Mapping[str, tuple], expected: Mapping[str, tuple]) -> list[str]:
    """Readable differences between two :func:`_shapes_by_path` results (empty if they fit),
    the model parameters' first."""
    out = []
    for path in sorted(set(stored) | set(expected), key=lambda p: (not p.startswith("params"), p)):
        if path not in expected:
            out.append(f"{path} is in the checkpoint but not in this run's state")
        elif path not in stored:
            out.append(f"{path} of this run's state is not in the checkpoint")
        elif stored[path] != expected[path]:
            out.append(f"{path} is {_fmt(stored[path])} there, {_fmt(expected[path])} here")
    return out


def _fmt(shape_dtype: tuple) -> str:
    shape, dtype = shape_dtype
    return f"{dtype}{list(shape)}"


def _some(items: list[str], n: int = 3) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


# ----------------------------------------------------------------------------- config record


def check_config_record(
    workdir: epath.PathLike,
    config: Mapping[str, Any],
    *,
    may_differ: Iterable[str],
    has_checkpoints: bool,
) -> None:
    """Records ``config`` (a nested dict) as ``<workdir>/config.json``, or checks it against the
    record.

    A workdir with checkpoints belongs to the config recorded at its first start: a field that
    differs raises :class:`ConfigMismatchError` with the differences, unless its dotted name is
    in ``may_differ`` (then a note is printed). A field present on one side only (a field added
    to or removed from the code since) is noted, not refused. Without checkpoints there is
    nothing to protect, and the record is (re)written atomically (by JAX process 0 only).
    """
    path = epath.Path(workdir) / CONFIG_RECORD
    current = json.loads(json.dumps(dict(config)))
    if not has_checkpoints or not path.exists():
        if has_checkpoints:
            print(f"Note: {path.parent} has checkpoints but no {CONFIG_RECORD}; recording it")
        if jax.process_index() == 0:
            text = json.dumps(current, indent=2, sort_keys=True) + "\n"
            reporting.write_text_atomic(path, text)
        return
    recorded = _read_record(path)
    differences = _config_differences(_flatten(recorded), _flatten(current))
    allowed = set(may_differ)
    refused = [d for d in differences if d[0] not in allowed and _MISSING not in d[1:]]
    if refused:
        raise ConfigMismatchError(
            f"workdir {path.parent} was made with another config ({path}): "
            f"{_some([_describe(d) for d in refused], 6)}. Rerun with the recorded values or use "
            f"another workdir (a rerun may change only: {', '.join(sorted(allowed))})"
        )
    if differences:
        print(f"Note: config differs from {path}: {_some([_describe(d) for d in differences], 6)}")


_MISSING = "<absent>"


def _read_record(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WorkdirError(
            f"{path} is unreadable ({e}); restore it or delete it to record the current config"
        ) from None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"solver": {"tol": 1e-4}}`` -> ``{"solver.tol": 1e-4}``."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _config_differences(recorded: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(field, recorded value, current value) for every field whose values differ."""
    fields = sorted(set(recorded) | set(current))
    pairs = [(f, recorded.get(f, _MISSING), current.get(f, _MISSING)) for f in fields]
    return [p for p in pairs if p[1] != p[2]]


def _describe(difference: tuple[str, Any, Any]) -> str:
    field, was, now = difference
    return f"{field} {was!r} -> {now!r}"


# ----------------------------------------------------------------------------- lock

_HELD_LOCKS: dict[str, int] = {}


@contextlib.contextmanager
def workdir_lock(workdir: epath.PathLike) -> Iterator[None]:
    """Holds ``<workdir>/lock`` (created with the workdir) for the block: one process per workdir.

    The lock file records the holder (pid, host, start time, command) and is held with an
    exclusive ``flock``: a second process refuses at once with :class:`WorkdirBusyError` naming
    the holder. It is released (the file removed) when the block exits, also on exceptions; a
    lock file left by a process that died is stale (the kernel dropped its ``flock``) and is
    taken over with a note. Nested use in one process is a no-op. Only JAX process 0 locks
    (the processes of one multi-host run share the workdir), and only local paths (a cloud
    path, ``gs://...``, has no ``flock``).
    """
    text = os.fspath(workdir)
    if "://" in text or jax.process_index() != 0:
        yield
        return
    os.makedirs(text, exist_ok=True)
    path = os.path.realpath(os.path.join(text, LOCK_FILE))
    if path in _HELD_LOCKS:
        _HELD_LOCKS[path] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[path] -= 1
        return
    fd = _acquire(path)
    _HELD_LOCKS[path] = 1
    try:
        yield
    finally:
        del _HELD_LOCKS[path]
        _release(fd, path)


def _acquire(path: str) -> int:
    """An fd holding the exclusive flock of ``path`` with this process's record written in it."""
    for _ in range(20):  # retries only while other processes remove and recreate the file
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {os.path.dirname(path)} is in use by {_holder(holder)}; wait for that "
                f"run to end or stop it (lock file {path})"
            ) from None
        if not _is_current_file(fd, path):  # removed by its releasing holder meanwhile
            os.close(fd)
            continue
        stale = _read_fd(fd)
        if stale:
            print(f"Note: taking over the stale lock of {_holder(stale)}, which is not running")
        _write_fd(fd, json.dumps(_this_process()) + "\n")
        return fd
    raise WorkdirBusyError(f"could not take the lock {path}: it keeps being replaced")


def _release(fd: int, path: str) -> None:
    try:
        if _is_current_file(fd, path):
            os.unlink(path)  # while still holding the flock, so no one else holds this file
    finally:
        os.close(fd)


def _is_current_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_fd(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return {"unreadable": data[:200].decode(errors="replace")}


def _write_fd(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
    os.fsync(fd)


def _this_process() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }


def _holder(record: dict | None) -> str:
    if not record or "pid" not in record:
        return "another process (its lock record is not written yet or unreadable)"
    return f"pid {record['pid']} on host {record.get('host')} (started {record.get('started')})"
