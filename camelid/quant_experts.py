"""Routed experts on the fast path: each expert kept quantized and built only when a token first reaches it.

A GGUF expert tensor [X, rows, K] stays a view of the file's memory map; expert e's gate/up and down kernels are
made from its own slice on first use (Q4_0 / Q4_1 / Q8_0 blocks keep their integers, as for other linears), so
a prompt pages in only the experts its tokens are routed to. Float expert tensors (HF folders, F16/F32 GGUFs)
are quantized per expert on first use for "int8"/"int4", and stay float (the reference module) for "auto".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quant as Q
from .formats import LazyTensor

_TO_INT8 = {"Q6_K", "Q8_1", "Q8_K"}


class QuantExperts(nn.Module):
    """Same forward as camelid.model.Experts: expert e on its tokens x [N,D] -> [N,D]."""

    def __init__(self, w1: LazyTensor, w2: LazyTensor, w3: LazyTensor, mode: str, device) -> None:
        super().__init__()
        self.parts, self.mode, self.device = (w1, w2, w3), mode, device
        self.n_experts = w1.shape[0]
        self._raw: list | None = None  # (kind, blocks [X,rows,bytes]) per part, read on first use
        self._float: list | None = None
        self._built: dict[int, tuple[nn.Module, nn.Module]] = {}

    @property
    def built(self) -> list[int]:
        """The experts whose kernels exist (those some token reached)."""
        return sorted(self._built)

    def _weight(self, i: int, e: int) -> Q.QuantWeight:
        part = self.parts[i]
        shape = tuple(part.shape[1:])
        if part.raw is not None:
            if self._raw is None:
                self._raw = [p.raw() if p.raw is not None else None for p in self.parts]
            kind, blocks = self._raw[i]
            if self.mode == "auto" or (self.mode == "int4" and kind in ("Q4_0", "Q4_1")):
                w = Q.from_gguf(kind, blocks[e], shape)
                if w is not None and (self.mode == "auto" or not w.doubled_input):
                    return w
        if self._float is None:
            self._float = [None, None, None]
        if self._float[i] is None:  # a float or other-quantized tensor: dequantize once, quantize per expert
            self._float[i] = part.load()
        w = self._float[i][e]
        mode = self.mode
        if mode == "auto":
            mode = "int8" if part.dtype in _TO_INT8 else "int4"
        if mode == "int4" and w.shape[1] % Q.GROUP == 0:
            return Q.int4_from_float(w)
        return Q.int8_from_float(w)

    def _kernels(self, e: int) -> tuple[nn.Module, nn.Module]:
        k = self._built.get(e)
        if k is None:
            gate, down, up = (self._weight(i, e) for i in range(3))
            try:
                w13 = Q.concat([gate, up])
            except ValueError:
                w13 = Q.concat([Q.int8_from_float(gate.dequantize()), Q.int8_from_float(up.dequantize())])
            k = self._built[e] = (Q.linear_for(w13, self.device), Q.linear_for(down, self.device))
        return k

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w13, w2 = self._kernels(e)
        gate, up = w13(x).chunk(2, dim=-1)
        return w2(F.silu(gate) * up)


def quant_experts(w1: LazyTensor, w2: LazyTensor, w3: LazyTensor, mode: str, device) -> QuantExperts | None:
    """The fast path's experts, or None to keep float experts (mode "auto" on float tensors)."""
    if mode == "auto" and w1.raw is None and w2.raw is None and w3.raw is None:
        return None
    return QuantExperts(w1, w2, w3, mode, device)
