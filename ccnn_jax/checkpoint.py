"""Orbax checkpoints of a training run: model/optimizer state, data iterator, metadata.

Each step directory holds three items, written atomically by orbax (a temporary directory
renamed on commit):

- ``state``: the train-state pytree (``StandardSave``),
- ``data``: the grain iterator position, one JSON file per JAX process
  (``grain.checkpoint.CheckpointSave``), so a resumed run sees the same batches,
- ``meta``: JSON (step, accumulated training seconds, ...).

A checkpoint that fails to restore is reported, moved to ``<workdir>/corrupt_checkpoints/`` and
the previous one is used.
"""

from __future__ import annotations

import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class Checkpointer:
    """Periodic + final checkpoints in ``directory`` (keeps the latest ``max_to_keep``)."""

    def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 3):
        self.directory = epath.Path(directory)
        self.max_to_keep = max_to_keep
        self._manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            create=True,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, state: Any, data_iterator: Any, meta: dict, *, force: bool = False
    ) -> None:
        """Saves (state, iterator position, meta) as step ``step`` (blocking, atomic)."""
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
        ``read_only=True`` never moves unreadable checkpoints aside (another run's directory).

        Returns ``(state, meta)``. Unreadable checkpoints are logged as errors and moved aside;
        if every checkpoint is unreadable a :class:`CheckpointError` names the directory.
        """
        steps = self.all_steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
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
