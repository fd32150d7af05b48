"""Stop requests from the outside world: SIGTERM and SIGUSR1 stop a run at a safe point instead of killing it.

Cluster schedulers preempt with SIGTERM (SLURM: ``--signal=B:USR1@120`` or a plain ``scancel``/requeue).
While a :class:`StopRequests` block is active, those signals only set :attr:`StopRequests.requested`; the
runner checks it at safe points — after every denoising step, between hand-off and decoded chunks, before
publishing — and there either writes a checkpoint and exits with code 75 (``runtime.checkpoint`` on) or
stops with :class:`~longvid.errors.Stopped` (exit 143) after removing every temporary file. Raising from the
handler itself would land anywhere (inside the encoder's pipe write, which rewraps it as an I/O error; inside
a publish), so only ``immediate=True`` blocks do that, where nothing is being written (the CLI importing
torch). Outside a block, and in threads other than the main one (where Python cannot install handlers),
nothing changes. SIGINT (Ctrl-C) keeps its meaning: abort, keep nothing.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class StopRequests:
    """Context manager catching :data:`STOP_SIGNALS`; ``requested`` is the name of the first one, or None.
    With ``immediate=True`` the first signal raises :class:`~longvid.errors.Stopped` where the program is."""

    def __init__(self, enabled: bool = True, immediate: bool = False):
        self.enabled = enabled
        self.immediate = immediate
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            return
        self.requested = signal.Signals(signum).name
        if self.immediate:
            raise self.stopped()

    def stopped(self):
        from longvid.errors import Stopped

        return Stopped(f"{self.requested}: stopped; nothing was kept (runtime.checkpoint=on_signal keeps progress "
                       "to resume from)")

    @contextmanager
    def immediately(self):
        """Within this block a stop raises at once (and one that already came raises on entry): for long phases that
        write nothing, such as loading a model, so a stop does not wait for them."""
        if self.requested is not None:
            raise self.stopped()
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False

    def __enter__(self) -> "StopRequests":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            # a handler installed from C reads back as None: restore the default action then
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        return False
