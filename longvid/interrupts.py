"""Stop requests from the outside world: SIGTERM and SIGUSR1 finish the current step instead of killing it.

Cluster schedulers preempt with SIGTERM (SLURM: ``--signal=B:USR1@120`` or a plain ``scancel``/requeue).
While a :class:`StopRequests` block is active, those signals only set :attr:`StopRequests.requested`; the
runner checks it after every denoising step (and between decoded chunks), writes a checkpoint and exits
with code 75 so a rerun resumes. A run that keeps no checkpoint (``checkpoint=False``) instead stops at
once with :class:`~longvid.errors.Stopped` (exit 143), which unwinds through the writers so every temporary
file is removed: a signal never leaves a partial file behind. Outside the block (and in threads other than
the main one, where Python cannot install handlers) nothing changes. SIGINT (Ctrl-C) keeps its meaning:
abort, keep nothing.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class StopRequests:
    """Context manager catching :data:`STOP_SIGNALS`; ``requested`` is the name of the first one, or None.
    With ``checkpoint=False`` the first signal raises :class:`~longvid.errors.Stopped` where the run is."""

    def __init__(self, enabled: bool = True, checkpoint: bool = True):
        self.enabled = enabled
        self.checkpoint = checkpoint
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            return
        self.requested = signal.Signals(signum).name
        if not self.checkpoint:
            from longvid.errors import Stopped

            raise Stopped(f"{self.requested}: stopped; nothing was kept (runtime.checkpoint=on_signal keeps "
                          "progress to resume from)")

    def __enter__(self) -> "StopRequests":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
