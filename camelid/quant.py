"""Weights that stay quantized at run time: int4 / int8 weight-only linear layers and a quantized embedding.

The matrix products run in PyTorch's own weight-only kernels (`_weight_int4pack_mm*`, `_weight_int8pack_mm`),
which are fast with bfloat16 inputs: a layer takes and returns the model's float32 activations and runs
its product in bfloat16 (the residual stream stays float32, which keeps near-tied logits in the reference's
order). Every quantized weight is first brought to one of two plain forms:

  Int4Weight: w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g],  q in 0..15,  g = k // group
  Int8Weight: w[n, k] = q[n, k] * scale[n],  q in -128..127 (one scale per output row)

GGUF blocks (decoded exactly by camelid/ggml_blocks.py to w = q * scale + bias per group) map onto Int4Weight
without loss of the integers (the scales become bfloat16, as the kernel wants):
  4 bits, groups of 32 (Q4_0, Q4_1, Q4_K): as they are, zero = bias + 8 scale.
  5 or 8 bits, groups of 32 (Q5_0, Q5_1, Q5_K, Q8_0): q = 16 hi + lo, two 4-bit halves over a doubled input
        [x, x]: hi (+8 when it fits) with scale 16 s and lo with scale s, so one int4 product gives s q + bias.
  6 bits, groups of 16 (Q6_K): the kernel's groups are at least 32 wide, so each 16-wide group j becomes one
        32-wide group [lo_j | hi_j + 8] over the input [x_j | 16 x_j] (`split16`), one scale and one zero.
Other GGUF types (Q2_K, Q3_K, IQ*) are dequantized once and requantized to int4 or int8 (lossy; see loader.py).

Long prefills (many tokens per row) are compute-bound, where the int4 kernel is slower than a dense product: a
call with at least DENSE_MIN_TOKENS tokens per row dequantizes the weight for the duration of that call, to
bfloat16 where the CPU has it natively and to float32 where it is only emulated (dense_dtype()); the
dequantization costs about as much as the kernel on ~100 tokens, so shorter
prompts and decode take the kernel. The choice goes by tokens per row, not by total rows, and generate.prefill
runs each row on its own, so a row takes the same path alone or batched beside others (the same greedy output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

GROUP = 32  # GGUF's block size; also camelid's int4 group when quantizing float weights


@dataclass
class Int4Weight:
    q: torch.Tensor  # uint8 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K // group]
    zero: torch.Tensor  # float32 [N, K // group]
    group: int = GROUP
    doubled_input: bool = False  # 5/8-bit values split into two nibbles: the layer's input is [x, x]
    split16: bool = False  # with doubled_input: Q6_K's layout, the input is [x_j, 16 x_j] per 16 columns j

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.q.shape
        return n, k // 2 if self.doubled_input else k

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.q.view(n, k // self.group, self.group).float()
        w = ((g - 8) * self.scale[..., None] + self.zero[..., None]).reshape(n, k)
        return combine_halves(w, self.doubled_input, self.split16)


def combine_halves(w: torch.Tensor, doubled: bool, split16: bool) -> torch.Tensor:
    """Weights over the kernel's (doubled) input [N, K'] -> the weight over x [N, K' / 2]."""
    if not doubled:
        return w
    n, k = w.shape
    if split16:
        v = w.view(n, k // 32, 2, 16)
        return (v[:, :, 0] + 16 * v[:, :, 1]).reshape(n, k // 2)
    return w[:, : k // 2] + w[:, k // 2 :]


def expand_input(x: torch.Tensor, doubled: bool, split16: bool) -> torch.Tensor:
    """x [M, K] -> the kernel's input: x, [x, x], or [x_j, 16 x_j] for each 16 columns j (exact in bfloat16)."""
    if not doubled:
        return x
    if split16:
        m, k = x.shape
        v = x.view(m, k // 16, 1, 16)
        return torch.cat([v, 16 * v], dim=2).view(m, 2 * k)
    return torch.cat([x, x], dim=-1)


@dataclass
class Int8Weight:
    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


QuantWeight = Int4Weight | Int8Weight


# --- from GGUF blocks ---------------------------------------------------------------------------------

DENSE_MIN_TOKENS = 128  # tokens per row from which a CPU call dequantizes and runs a dense bf16 product
CHUNK_ROWS = 4096  # rows converted at a time: bounds the temporaries (a multiple of the CPU packing's 64-row blocks)


def from_gguf(kind: str, data: np.ndarray, shape: tuple[int, int]) -> Int4Weight | None:
    """GGUF rows (uint8 [N, bytes per row]) of a type in ggml_blocks.SUPPORTED as an Int4Weight; None for others."""
    from . import ggml_blocks

    if kind not in ggml_blocks.SUPPORTED:
        return None
    n, k = shape
    data = np.asarray(data)
    out = None  # filled a chunk of rows at a time (no list of parts concatenated: half the peak memory)
    for i in range(0, n, CHUNK_ROWS):
        part = int4_from_blocks(ggml_blocks.decode(kind, data[i : i + CHUNK_ROWS], k))
        if out is None:
            if part.q.shape[0] == n:
                return part
            out = Int4Weight(part.q.new_empty(n, part.q.shape[1]), part.scale.new_empty(n, part.scale.shape[1]),
                             part.zero.new_empty(n, part.zero.shape[1]), part.group, part.doubled_input, part.split16)
        rows = slice(i, i + part.q.shape[0])
        out.q[rows], out.scale[rows], out.zero[rows] = part.q, part.scale, part.zero
        del part
    return out


def int4_from_blocks(b) -> Int4Weight:
    """Decoded GGUF blocks (ggml_blocks.Blocks: w = q * scale + bias) laid out for the int4 kernel, integers intact."""
    q, s, bias = torch.from_numpy(b.q), torch.from_numpy(b.scale), torch.from_numpy(b.bias)
    n, k = q.shape
    if b.bits <= 4 and b.group == GROUP:
        return Int4Weight(q, s, bias + 8 * s, GROUP)
    hi, lo = q >> 4, q & 0x0F
    if b.group == GROUP:  # [hi + c | lo], scales [16 s | s]: 16 s (hi + c - 8) + s (lo - 8) + zero = s q + bias
        c = 8 if b.bits <= 7 else 0
        zero = bias + 8 * s + 16 * (8 - c) * s
        return Int4Weight(torch.cat([hi + c, lo], dim=1), torch.cat([16 * s, s], dim=1),
                          torch.cat([torch.zeros_like(s), zero], dim=1), GROUP, doubled_input=True)
    if b.group == 16 and b.bits <= 6:  # per group j: [lo_j | hi_j + 8] over [x_j | 16 x_j]: s q - 8 s + 17 zero
        pairs = torch.stack([lo.view(n, k // 16, 16), (hi + 8).view(n, k // 16, 16)], dim=2).view(n, 2 * k)
        return Int4Weight(pairs, s, (bias + 8 * s) / 17, GROUP, doubled_input=True, split16=True)
    raise ValueError(f"no int4 layout for {b.bits}-bit values in groups of {b.group}")


# --- from float weights -------------------------------------------------------------------------------

def int4_from_float(w: torch.Tensor, group: int = GROUP) -> Int4Weight:
    """Asymmetric 4-bit quantization in groups along K (min/max per group)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
    return Int4Weight(q.to(torch.uint8).reshape(n, k), scale, lo + 8 * scale, group)


def int8_from_float(w: torch.Tensor) -> Int8Weight:
    """Symmetric 8-bit quantization with one scale per output row."""
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return Int8Weight((w / scale[:, None]).round().clamp(-128, 127).to(torch.int8), scale)


def concat(weights: list[QuantWeight]) -> QuantWeight:
    """Several weights with the same input stacked along N (fused Q/K/V or gate/up projections)."""
    a = weights[0]
    if isinstance(a, Int4Weight):
        layout = (a.group, a.doubled_input, a.split16)
        if any(not isinstance(w, Int4Weight) or (w.group, w.doubled_input, w.split16) != layout for w in weights):
            raise ValueError("cannot fuse int4 weights of different layouts")
        return Int4Weight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]),
                          torch.cat([w.zero for w in weights]), *layout)
    if any(not isinstance(w, Int8Weight) for w in weights):
        raise ValueError("cannot fuse int8 with other weights")
    return Int8Weight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]))


# --- modules ------------------------------------------------------------------------------------------

class _FrozenQuantMatmul(torch.autograd.Function):
    """y = layer(x) with a frozen quantized weight, differentiable with respect to x only (QLoRA).

    PyTorch's weight-only kernels have no backward. The forward runs the layer as at inference; the backward is
    grad_x = grad_y @ W with W dequantized on the fly, CHUNK_ROWS output rows at a time and never stored (the
    pattern of torchao's linear_nf4). The weight gets no gradient. The backward's product is in autocast's type
    when the forward ran under autocast (bfloat16 training, as the float base's products are there), else in
    float32; chunks of a wide layer are summed in float32. rows(start, end, dtype) gives W's rows in dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, run, rows, n_out: int) -> torch.Tensor:
        ctx.rows, ctx.n_out, ctx.x_dtype = rows, n_out, x.dtype
        device = x.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.to(ctx.dtype)
        out = None
        for start in range(0, ctx.n_out, CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, ctx.n_out)
            part = g[..., start:end] @ ctx.rows(start, end, ctx.dtype)  # [..., in]
            if end == ctx.n_out and out is None:  # one chunk: no float32 sum needed
                out = part
            else:
                out = part.float() if out is None else out.add_(part)
        return out.to(ctx.x_dtype), None, None, None


def _differentiable(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad



def _dense(shape: torch.Size, x: torch.Tensor) -> bool:
    """A long prefill on the CPU: at least DENSE_MIN_TOKENS tokens per row."""
    return len(shape) == 3 and shape[1] >= DENSE_MIN_TOKENS and x.device.type == "cpu"


def dense_dtype() -> torch.dtype:
    """The type of a long prefill's dense product: bfloat16 where the CPU has it natively (AVX512-BF16, AMX),
    float32 where bfloat16 is only emulated (AVX2, plain AVX-512), which is there several times faster (measured on
    a 2-core AVX2 EPYC: the default model's 512-token prefill at 381 against 57 tokens/s)."""
    from .cpu import cpu_has_native_bf16

    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


class Int4Linear(nn.Module):
    """y = x W^T with W kept as packed 4-bit integers and per-group bf16 scale/zero (PyTorch's int4 kernel)."""

    def __init__(self, w: Int4Weight, device: torch.device | str = "cpu", dense_prefill: bool = True) -> None:
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = w.shape
        self.group, self.doubled_input, self.split16 = w.group, w.doubled_input, w.split16
        q, pad = w.q, -w.q.shape[0] % 16  # the kernels want N a multiple of 16: pad with rows of zeros
        if pad:
            q = torch.cat([q, torch.zeros(pad, q.shape[1], dtype=q.dtype)])
            none = torch.zeros(pad, w.scale.shape[1])
            w = Int4Weight(q, torch.cat([w.scale, none]), torch.cat([w.zero, none]), w.group, w.doubled_input, w.split16)
        if device.type == "cpu":  # packed a chunk of rows at a time (the int32 input is 4 bytes per weight), in place
            packed = None
            for i in range(0, q.shape[0], CHUNK_ROWS):
                part = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i : i + CHUNK_ROWS].to(torch.int32), 2)
                if packed is None:
                    packed = part.new_empty(q.shape[0], *part.shape[1:])
                packed[i : i + part.shape[0]] = part
                del part
        else:  # CUDA: the kernel wants the pairs packed into uint8 first
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(device), 8)
        self.register_buffer("packed", packed.to(device))
        self.register_buffer("scale_zero", torch.stack([w.scale.t(), w.zero.t()], -1).to(torch.bfloat16).contiguous().to(device))
        # for dense prefill: the nibbles two to a byte, row-major (half the bytes of the unpacked values)
        self.register_buffer("nibbles", (w.q[:, ::2] | w.q[:, 1::2] << 4).to(device) if dense_prefill else None)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """W [out, in] in dtype (for a dense product)."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Output rows start..end of W [end - start, in] in dtype: computed in float32 and rounded once."""
        if self.nibbles is None:
            raise RuntimeError("this layer keeps no copy for dequantizing (dense_prefill=False)")
        if (not self.doubled_input and self.nibbles.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                and kernels.loaded()):
            # camelid's C++ (camelid/kernels.py): the same values bit for bit, in one pass instead of six
            return kernels.dequantize_int4(self.nibbles, self.scale_zero, start, end, self.group, dtype)
        nib = self.nibbles[start:end]
        n, half = nib.shape
        q = torch.stack([nib & 0x0F, nib >> 4], -1).view(n, half * 2 // self.group, self.group).float()
        s, z = self.scale_zero[:, start:end, 0].t().float(), self.scale_zero[:, start:end, 1].t().float()
        w = q.sub_(8).mul_(s[..., None]).add_(z[..., None]).view(n, half * 2)  # in place: one float32 buffer
        return combine_halves(w, self.doubled_input, self.split16).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _differentiable(x):  # training through a frozen quantized base: gradients flow to x only
            return _FrozenQuantMatmul.apply(x, self._forward, self.dequantize_rows, self.out_features)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype  # the product in bfloat16 (the kernels' type), the result in x's type
        x = x.reshape(-1, shape[-1])
        if _dense(shape, x) and self.nibbles is not None:
            wanted = dense_dtype()
            y = F.linear(x.to(wanted), self.dequantize(wanted))
        else:
            x = expand_input(x.to(torch.bfloat16), self.doubled_input, self.split16)
            if x.device.type == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_zero)
            else:
                y = torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.scale_zero)
        if y.shape[-1] != self.out_features:  # padded rows, on either path
            y = y[:, : self.out_features]
        return y.reshape(*shape[:-1], self.out_features).to(dtype)


class Int8Linear(nn.Module):
    """y = x W^T with W kept as int8 and one bf16 scale per output row (PyTorch's int8 weight-only kernel)."""

    def __init__(self, w: Int8Weight, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.register_buffer("q", w.q.to(device))
        self.register_buffer("scale", w.scale.to(torch.bfloat16).to(device))

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Output rows start..end of W [end - start, in] in dtype (for the backward pass)."""
        return (self.q[start:end].float() * self.scale[start:end, None].float()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _differentiable(x):  # training through a frozen quantized base: gradients flow to x only
            return _FrozenQuantMatmul.apply(x, self._forward, self.dequantize_rows, self.out_features)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype  # the product in bfloat16 (the kernels' type), the result in x's type
        x = x.reshape(-1, shape[-1])
        if _dense(shape, x):
            wanted = dense_dtype()
            y = F.linear(x.to(wanted), self.q.to(wanted) * self.scale[:, None].to(wanted))
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale)
        return y.view(*shape[:-1], self.out_features).to(dtype)


def linear_for(w: QuantWeight, device: torch.device | str = "cpu", dense_prefill: bool = True) -> nn.Module:
    """The layer for a weight; dense_prefill=False saves the int4 layer's copy for dense products (the output
    layer, which prefill applies to one position per row)."""
    return Int4Linear(w, device, dense_prefill) if isinstance(w, Int4Weight) else Int8Linear(w, device)


class QuantEmbedding(nn.Module):
    """Token embedding rows kept quantized; only the looked-up rows are dequantized."""

    def __init__(self, w: QuantWeight, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.dtype = dtype
        if isinstance(w, Int4Weight) and w.doubled_input:  # 5-8 bits: back to one int8 value per weight
            n, k2 = w.q.shape
            q = torch.empty(n, k2 // 2, dtype=torch.int8)
            for i in range(0, n, CHUNK_ROWS):
                rows = w.q[i : i + CHUNK_ROWS].to(torch.int16)
                if w.split16:  # [lo_j | hi_j] per 16: w = s (lo + 16 (hi - 8)) + 17 z - 8 s
                    pairs = rows.view(rows.shape[0], k2 // 32, 2, 16)
                    lo, hi = pairs[:, :, 0].reshape(-1, k2 // 2), pairs[:, :, 1].reshape(-1, k2 // 2)
                else:  # [hi | lo]: w = s_lo (16 (hi - 8) + lo) + z_hi + z_lo - 8 s_lo
                    hi, lo = rows[:, : k2 // 2], rows[:, k2 // 2 :]
                q[i : i + CHUNK_ROWS] = (16 * (hi - 8) + lo).to(torch.int8)
            if w.split16:
                scale, zero = w.scale, 17 * w.zero - 8 * w.scale
            else:
                half = w.scale.shape[1] // 2
                scale = w.scale[:, half:]
                zero = w.zero[:, :half] + w.zero[:, half:] - 8 * scale
            self.register_buffer("q", q.to(device))
            self.register_buffer("scale", scale.to(device))
            self.register_buffer("zero", zero.to(device))
            self.offset = 0
        elif isinstance(w, Int4Weight):
            self.register_buffer("q", w.q.to(device))
            self.register_buffer("scale", w.scale.to(device))
            self.register_buffer("zero", w.zero.to(device))
            self.offset = 8
        else:
            self.register_buffer("q", w.q.to(device))
            self.register_buffer("scale", w.scale[:, None].to(device))
            self.register_buffer("zero", torch.zeros_like(self.scale))
            self.offset = 0

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows `ids` of the table, dequantized exactly, in float32 [..., K]."""
        q = self.q[ids].float()  # [..., K]
        k = q.shape[-1]
        g = k // self.scale.shape[-1]
        q = q.view(*q.shape[:-1], k // g, g)
        w = (q - self.offset) * self.scale[ids][..., None] + self.zero[ids][..., None]
        return w.reshape(*ids.shape, k)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).to(self.dtype)


class QuantOutput(nn.Module):
    """The output layer (hidden -> logits) on the quantized kernel, with its leading logits made exact.

    The kernels return bfloat16, whose 8-bit mantissa steps by 0.125 at a logit of 25: close candidates tie or
    swap (the default model then answers in French). So the REFINE highest logits of each position are
    recomputed in float32 from the exact rows of the weight (`table`, shared with a tied embedding), which is
    what greedy decoding, top-k and top-p look at; the rest keep the kernel's value.
    """

    REFINE = 32

    def __init__(self, kernel: nn.Module, table: QuantEmbedding) -> None:
        super().__init__()
        self.kernel, self.table = kernel, table
        self.out_features = kernel.out_features

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight [V, D] in dtype, exact rows rounded once, CHUNK_ROWS at a time (no float32 copy of it
        all): for training's fused output-and-loss step (camelid/train/head.py), which takes a dense weight."""
        n, k = self.table.q.shape
        out = torch.empty(n, k, dtype=dtype, device=self.table.q.device)
        for start in range(0, n, CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, n)
            out[start:end] = self.table.rows(torch.arange(start, end, device=out.device))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _differentiable(x):  # the kernel's rows from the exact table in the backward pass (no dequantized copy)
            rows = lambda a, b, dtype: self.table.rows(torch.arange(a, b, device=x.device)).to(dtype)  # noqa: E731
            logits = _FrozenQuantMatmul.apply(x, self.kernel._forward, rows, self.out_features).float()
        else:
            logits = self.kernel(x).float()
        top = logits.topk(min(self.REFINE, logits.shape[-1]), dim=-1).indices  # [..., R]
        exact = (self.table.rows(top) * x.float()[..., None, :]).sum(-1)  # [..., R]
        return logits.scatter_(-1, top, exact)
