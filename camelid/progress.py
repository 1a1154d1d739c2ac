"""A small progress bar on stderr for downloads, conversion and other long work."""

from __future__ import annotations

import sys
import time


class Progress:
    """Progress(total, label).update(n) ... .close(). Redraws in place on a terminal; elsewhere
    (logs, CI) prints a line at every quarter so logs stay short."""

    def __init__(self, total: int | None, label: str, unit: str = "B", stream=None) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.start = self._last = time.monotonic()
        self._quarter = -1

    def _fmt(self, n: float) -> str:
        if self.unit == "B":
            return f"{n / 1e6:.1f} MB"
        return f"{n:.0f} {self.unit}"

    def _line(self) -> str:
        rate = self.done / max(time.monotonic() - self.start, 1e-9)
        if self.total:
            pct = 100 * self.done / self.total
            return f"{self.label}: {pct:5.1f}% {self._fmt(self.done)} / {self._fmt(self.total)} ({self._fmt(rate)}/s)"
        return f"{self.label}: {self._fmt(self.done)} ({self._fmt(rate)}/s)"

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self._last >= 0.1:
                self._last = now
                self.stream.write("\r" + self._line() + "\033[K")
                self.stream.flush()
        elif self.total:
            quarter = int(4 * self.done / self.total)
            if quarter > self._quarter and quarter < 4:
                self._quarter = quarter
                print(self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line() + "\033[K\n")
        else:
            print(self._line(), file=self.stream)
        self.stream.flush()
