"""What long work shows a person: one progress line with count, rate and ETA, refreshed in place
on a terminal and printed every few seconds otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    def __init__(self, label: str, total: int, unit: str = "items", every: float = 5.0, stream=None):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = self.last = time.monotonic()

    def _line(self, n: int) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = n / elapsed
        pct = f" ({100 * n / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {max(self.total - n, 0) / rate:.0f} s" if rate > 0 and self.total and n < self.total else ""
        return f"{self.label}: {n:,}/{self.total:,} {self.unit}{pct}, {rate:,.0f} {self.unit}/s{eta}"

    def update(self, n: int) -> None:
        now = time.monotonic()
        if now - self.last < (0.5 if self.tty else self.every):
            return
        self.last = now
        self.stream.write(("\r" + self._line(n) + "   ") if self.tty else self._line(n) + "\n")
        self.stream.flush()

    def done(self, n: int) -> None:
        elapsed = time.monotonic() - self.started
        line = f"{self.label}: {n:,} {self.unit} in {elapsed:.1f} s ({n / max(elapsed, 1e-9):,.0f} {self.unit}/s)"
        self.stream.write(("\r" + line + " " * 20 + "\n") if self.tty else line + "\n")
        self.stream.flush()
