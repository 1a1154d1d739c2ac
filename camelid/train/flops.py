"""FLOPs of a training step and the machine's peak, for MFU (model FLOPs utilization).

FLOP formula (PaLM appendix B, as nanoGPT and torchtitan use it), per trained token at sequence length T:

    6 * N_matmul + 12 * n_layers * dim * T

N_matmul: the weights that take part in matrix multiplies (every linear layer, the output layer included; not the
embedding lookup, not the norms); 6 = 2 (multiply-add) x 3 (forward, backward for inputs, backward for weights).
12 * L * d * T: the attention score and value matmuls (QK^T and AV, forward and backward), counted at full T x T
(no causal halving, as PaLM counts it). Activation checkpointing's recomputation is not counted (model FLOPs,
not hardware FLOPs).

Peak: measured here, not taken from a datasheet: the best of a few large square matrix multiplies in the
training precision (bf16 or float32) on the device, with the threads torch uses.
"""

from __future__ import annotations

import time

import torch

from ..config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights in matrix multiplies: every linear of every block and the output layer (tied or not)."""
    hd = cfg.head_dim
    attn = cfg.dim * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    ffn = 3 * cfg.dim * cfg.hidden_dim
    return cfg.n_layers * (attn + ffn) + cfg.dim * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (see the module docstring)."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.dim * seq_len


def measure_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: int | None = None,
                 seconds: float = 1.0) -> float:
    """FLOP/s of the best n x n matmul in `dtype` on `device` over about `seconds` (n: 2048 on a CPU, 8192 on CUDA)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    torch.mm(a, b)  # warm up (oneDNN / cuBLAS picks its kernel)
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return 2 * n**3 / best
