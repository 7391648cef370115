"""What stops a run early and how it is reported: non-finite steps and SIGTERM / SIGINT.

Either stop leaves the checkpoints written so far intact; the messages say what to do next.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from ccnn_jax import checkpoint as checkpoint_lib


class TrainingStopped(RuntimeError):
    """Training stopped before ``num_steps``; the checkpoints written so far are intact.

    ``exit_code`` is the status the command-line scripts exit with.
    """

    exit_code = 1


class NonFiniteError(TrainingStopped):
    """A step produced a NaN or inf; it was not applied and nothing after it was written."""


class Interrupted(TrainingStopped):
    """SIGTERM or SIGINT: the current step was finished and checkpointed, then the run stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """Within the block, SIGTERM and SIGINT set :attr:`signum` instead of ending the process, so
    the loop can finish its step and checkpoint. The previous handlers return with the first
    signal (a second one acts as usual) and when the block ends. Main thread only."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> StopOnSignal:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        self.signum = signum
        self._restore()
        print(
            f"\nReceived {signal.Signals(signum).name}: finishing the current step and saving a "
            "checkpoint (send it again to stop at once)",
            flush=True,
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __exit__(self, *exc_info) -> None:
        self._restore()


def interrupted(signum: int, step: int, ckpt: checkpoint_lib.Checkpointer) -> Interrupted:
    name = signal.Signals(signum).name
    return Interrupted(
        f"stopped by {name} after step {step}, saved as a checkpoint in {ckpt.directory}; rerun "
        "the same command to resume",
        signum,
    )
