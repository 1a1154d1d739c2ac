"""The loss curve as a PNG, drawn here (no plotting library): training loss per step (blue), validation loss
(red dots), axes with the first and last step and the lowest and highest loss written in a small pixel font.

    loss_curve_png(records, "OUT/loss.png")   # records: metrics.jsonl's objects
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

# 3 x 5 pixel digits and the few characters the labels need, one row of 3 bits per line
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "e": "000111111100011", "s": "011100010001110", "t": "010111010010011",
    "p": "110101110100100", "l": "100100100100111", "o": "000111101101111", "v": "000101101101010",
    "a": "000011101101011", "r": "000110100100100", "i": "010000010010010", "n": "000110101101101",
}
BLUE, RED, BLACK, GREY = (31, 119, 180), (214, 39, 40), (0, 0, 0), (200, 200, 200)


def _png(pixels: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG bytes."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.px = np.full((h, w, 3), 255, dtype=np.uint8)

    def dot(self, x: float, y: float, color, r: int = 0) -> None:
        h, w, _ = self.px.shape
        x, y = int(round(x)), int(round(y))
        self.px[max(0, y - r): min(h, y + r + 1), max(0, x - r): min(w, x + r + 1)] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for t in np.linspace(0, 1, n + 1):
            self.dot(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, color)

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 2) -> None:
        for i, ch in enumerate(s):
            bits = _FONT.get(ch, _FONT[" "])
            for k, bit in enumerate(bits):
                if bit == "1":
                    row, col = divmod(k, 3)
                    x0, y0 = x + (i * 4 + col) * scale, y + row * scale
                    self.px[y0: y0 + scale, x0: x0 + scale] = color


def _fmt(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.0f}"


def loss_curve_png(records: list[dict], path: str | os.PathLike, width: int = 640, height: int = 400) -> None:
    """Write the loss curve of metrics records ({"step", "loss", "val_loss"?}) to `path` (PNG)."""
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    c = _Canvas(width, height)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    c.line(left, bottom, right, bottom, BLACK)
    c.line(left, top, left, bottom, BLACK)
    if steps:
        ys = losses + [v for _, v in vals]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
        X = lambda s: left + (s - s0) / (s1 - s0) * (right - left)  # noqa: E731
        Y = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
        for frac in (0.25, 0.5, 0.75):
            c.line(left + 1, top + frac * (bottom - top), right, top + frac * (bottom - top), GREY)
        for (a, la), (b, lb) in zip(zip(steps, losses), zip(steps[1:], losses[1:])):
            c.line(X(a), Y(la), X(b), Y(lb), BLUE)
        if len(steps) == 1:
            c.dot(X(steps[0]), Y(losses[0]), BLUE, 2)
        for s, v in vals:
            c.dot(X(s), Y(v), RED, 3)
        c.text(4, top, _fmt(hi))
        c.text(4, bottom - 10, _fmt(lo))
        c.text(left, bottom + 8, str(s0))
        c.text(right - 8 * len(str(s1)), bottom + 8, str(s1))
    c.text(left + (right - left) // 2 - 40, bottom + 22, "step", BLACK)
    c.text(left + 10, 4, "train loss", BLUE)
    c.text(left + 110, 4, "val loss", RED)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(_png(c.px))
    os.replace(tmp, path)
