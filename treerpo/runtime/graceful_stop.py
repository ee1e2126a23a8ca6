"""SIGINT / SIGTERM during training: the first asks the loop to stop after the current step, the second stops at once.

The trainer polls ``requested`` between steps, writes a checkpoint and raises
``TrainingInterrupted``; the command line turns that into exit code 128 + the signal number.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class GracefulStop:
    """Installs the handlers inside a ``with`` block (main thread only; elsewhere it does nothing)."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once, no checkpoint")
        self.requested = signum
        # os.write, not print: the signal may have interrupted a write to sys.stderr (re-entering it raises)
        os.write(
            2,
            f"\n{signal.Signals(signum).name} received: finishing the current step, then writing a "
            "checkpoint; send it again to stop at once\n".encode(),
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: installed from C
        self._previous.clear()

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. nohup: the user asked to ignore it
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
