"""A small progress bar on stderr for downloads, conversion and other long work."""

from __future__ import annotations

import sys
import time


class Progress:
    """Progress(total, label).update(n) ... .close(). Redraws in place on a terminal; elsewhere
    (logs, CI) prints a line at every quarter (or every `every` units) so logs stay short.

    initial: units already done before this run (a resumed training): the rate and the ETA count only
    this run's. update(n, status=...) shows a status text after the figures (a training loss, tokens/s).
    """

    def __init__(self, total: int | None, label: str, unit: str = "B", stream=None, initial: int = 0,
                 every: int | None = None) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = self.initial = initial
        self.every = every
        self.status = ""
        self.start = self._last = time.monotonic()
        self._quarter = -1

    def _fmt(self, n: float) -> str:
        if self.unit == "B":
            return f"{n / 1e6:.1f} MB"
        return f"{n:.0f} {self.unit}"

    def _rate(self, r: float) -> str:
        """A rate of a few units a second keeps its decimals (training: 0.35 step/s, not 0)."""
        return self._fmt(r) if self.unit == "B" or r >= 10 else f"{r:.2f} {self.unit}"

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.done - self.initial) / elapsed
        status = f" {self.status}" if self.status else ""
        if self.total:
            pct = 100 * self.done / self.total
            eta = f" ETA {_clock((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
            return (f"{self.label}: {pct:5.1f}% {self._fmt(self.done)} / {self._fmt(self.total)} ({self._rate(rate)}/s)"
                    f"{status}{eta}")
        return f"{self.label}: {self._fmt(self.done)} ({self._rate(rate)}/s){status}"

    def update(self, n: int, status: str | None = None) -> None:
        self.done += n
        if status is not None:
            self.status = status
        now = time.monotonic()
        if self.tty:
            if now - self._last >= 0.1:
                self._last = now
                self.stream.write("\r" + self._line() + "\033[K")
                self.stream.flush()
        elif self.every:
            if self.done % self.every == 0 and (not self.total or self.done < self.total):
                print(self._line(), file=self.stream, flush=True)
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


def _clock(seconds: float) -> str:
    """1:02:03 or 2:03."""
    s = int(seconds + 0.5)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"
