"""Progress lines for long steps (cells/s and ETA), written to stderr so they land in rule logs."""

from __future__ import annotations

import sys
import time


class Progress:
    """Print ``label: done/total unit (rate/s, ETA)`` at most every ``interval`` seconds and at the end."""

    def __init__(self, label: str, total: int, *, unit: str = "items", interval: float = 5.0) -> None:
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        """Record ``n`` more items and print when due."""
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def close(self) -> None:
        """Print the final line."""
        self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(
            f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({rate:,.0f} {self.unit}/s, "
            f"elapsed {elapsed:.1f} s, ETA {eta:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
