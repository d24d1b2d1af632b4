"""The simulator's notion of "now".

The propagation delay is the whole point of the simulator, and nobody wants a test or a
demo that waits fifteen real minutes. `SimClock` follows real UTC time until someone sets
or advances it (in-process, or via `POST /_sim/clock`); it then stays frozen there, so a
test can stand exactly one second before a change becomes visible.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class SimClock:
    """Real UTC time, or a frozen instant once set/advanced; thread-safe."""

    def __init__(self, start: datetime | None = None) -> None:
        self._lock = threading.Lock()
        self._frozen: datetime | None = _aware(start) if start is not None else None
        self._offset = timedelta(0)

    @staticmethod
    def _real() -> datetime:
        # Looked up at call time so freezegun, when a test uses it in-process, applies.
        return datetime.now(UTC)

    def now(self) -> datetime:
        with self._lock:
            if self._frozen is not None:
                return self._frozen
            return self._real() + self._offset

    @property
    def frozen(self) -> bool:
        with self._lock:
            return self._frozen is not None

    def set(self, when: datetime) -> datetime:
        """Freeze at `when` (naive means UTC)."""
        with self._lock:
            self._frozen = _aware(when)
            return self._frozen

    def advance(self, seconds: float | timedelta) -> datetime:
        """Move forward; a running clock stays running, shifted by the same amount."""
        step = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        with self._lock:
            if self._frozen is not None:
                self._frozen += step
                return self._frozen
            self._offset += step
            return self._real() + self._offset

    def resume(self) -> datetime:
        """Let time flow again from the current instant (no jump back to real time)."""
        with self._lock:
            if self._frozen is not None:
                self._offset = self._frozen - self._real()
                self._frozen = None
            return self._real() + self._offset

    def reset(self) -> datetime:
        """Back to plain real time."""
        with self._lock:
            self._frozen = None
            self._offset = timedelta(0)
            return self._real()
