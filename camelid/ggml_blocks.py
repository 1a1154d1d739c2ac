"""GGUF's quantized blocks decoded to their integers and scales, exactly: w = q * scale + bias per group.

Each supported block type turns rows of blocks (uint8 [N, bytes per row], a view of the file) into

  q      uint8 [N, K]          the stored integers, 0 .. 2^bits - 1
  scale  float32 [N, K // g]   the step of each group of g weights
  bias   float32 [N, K // g]   the offset of each group

with w[n, k] = q[n, k] * scale[n, k // g] + bias[n, k // g] equal, bit for bit, to gguf-py's dequantization
(`gguf.quants.dequantize`): every scale is a product of an f16 and a small integer (exact in float32), and the
one rounding, the final sum, is the same. Nothing is requantized: camelid/quant.py lays these integers out for
PyTorch's int4 kernel as they are.

  type   g   bits  stored as                                   here
  Q4_0   32  4     d, 4-bit q:        w = d (q - 8)            scale d, bias -8d
  Q4_1   32  4     d, m, 4-bit q:     w = d q + m              scale d, bias m
  Q5_0   32  5     d, 5-bit q:        w = d (q - 16)           scale d, bias -16d
  Q5_1   32  5     d, m, 5-bit q:     w = d q + m              scale d, bias m
  Q8_0   32  8     d, int8 q8:        w = d q8                 q = q8 + 128, scale d, bias -128d
  Q4_K   32  4     super-block of 256: d, dmin, 6-bit sc, m per 32: w = d sc q - dmin m
  Q5_K   32  5     as Q4_K with a fifth bit
  Q6_K   16  6     super-block of 256: d, int8 sc per 16:  w = d sc (q - 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256  # K-quant super-block
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
BLOCK_SIZE = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}
SUPPORTED = tuple(BLOCK_BYTES)


@dataclass
class Blocks:
    """Decoded blocks: w = q * scale + bias, one (scale, bias) per `group` consecutive weights of a row."""

    q: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [N, K // group]
    bias: np.ndarray  # float32 [N, K // group]
    group: int
    bits: int

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        q = self.q.reshape(n, k // self.group, self.group).astype(np.float32)
        return (q * self.scale[..., None] + self.bias[..., None]).reshape(n, k)


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per block -> float32 [..., 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, runs: int) -> np.ndarray:
    """4-bit payload [..., runs * L/2] -> [..., runs * L]: in each run the low nibbles come first, then the high."""
    qs = qs.reshape(*qs.shape[:-1], runs, -1)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(*qs.shape[:-2], -1)


def _fifth_bit(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: the 32 high bits of a block (a little-endian uint32, bit j for element j) -> uint8 [..., 32]."""
    bits = np.ascontiguousarray(qh).view(np.uint32)  # [..., 1]
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def decode(kind: str, rows: np.ndarray, k: int) -> Blocks:
    """Rows of GGUF blocks of type `kind` (uint8 [N, bytes per row]) for rows of k weights."""
    if kind not in BLOCK_BYTES:
        raise ValueError(f"no exact decoding for GGUF type {kind}")
    n = rows.shape[0]
    if k % BLOCK_SIZE[kind]:
        raise ValueError(f"{kind} rows of {k} weights are not whole blocks of {BLOCK_SIZE[kind]}")
    b = np.asarray(rows).reshape(n, k // BLOCK_SIZE[kind], BLOCK_BYTES[kind])  # [N, blocks, bytes]
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        d = _f16(b[..., 0:2])  # [N, G, 1]
        has_min = kind.endswith("_1")
        at = 4 if has_min else 2
        if kind.startswith("Q5"):
            q = _nibbles(b[..., at + 4 :], 1) | (_fifth_bit(b[..., at : at + 4]) << 4)
            bits, mid = 5, 16
        else:
            q, bits, mid = _nibbles(b[..., at:], 1), 4, 8
        bias = _f16(b[..., 2:4]) if has_min else -mid * d
        return Blocks(q.reshape(n, k), d[..., 0], bias[..., 0], 32, bits)
    if kind == "Q8_0":
        d = _f16(b[..., 0:2])
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(q.reshape(n, k), d[..., 0], -128 * d[..., 0], 32, 8)
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [N, S, 1]
        sc, mn = _k_scale_min(b[..., 4:16])  # [N, S, 8]
        if kind == "Q4_K":  # 4 runs of 64: 32 low nibbles then 32 high
            q, bits = _nibbles(b[..., 16:], 4), 4
        else:  # qh[32]: bit j of byte l is the fifth bit of element 32 j + l
            qh = b[..., 16:48]
            high = ((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, -1, QK_K)
            q, bits = _nibbles(b[..., 48:], 4) | (high << 4), 5
        return Blocks(q.reshape(n, k), (d * sc).reshape(n, -1), -(dmin * mn).reshape(n, -1), 32, bits)
    # Q6_K: ql[128] qh[64] sc[16] d; two halves of 128, each 4 runs of 32 taking nibbles of ql and 2-bit pairs of qh
    ql, qh = b[..., :128].reshape(n, -1, 2, 64), b[..., 128:192].reshape(n, -1, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # [N, S, 2, 128]: runs 0,1 low nibbles, runs 2,3 high
    high = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3).reshape(n, -1, 2, 128)
    q = (low | (high << 4)).reshape(n, k)
    scale = (_f16(b[..., 208:210]) * b[..., 192:208].view(np.int8).astype(np.float32)).reshape(n, -1)
    return Blocks(q, scale, -32 * scale, 16, 6)
