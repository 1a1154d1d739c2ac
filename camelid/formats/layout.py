"""Q/K row layouts, written once.

Meta's checkpoints and GGUF files order each head's Q/K rows for *interleaved* RoPE (pairs 2i, 2i+1);
Hugging Face and camelid order them for *rotate-half* RoPE (pairs i, i + E/2). Converting a head's
rows between the two is a fixed permutation.
"""

from __future__ import annotations

import torch


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows [n_heads*E, ...] from interleaved (Meta/GGUF) order to rotate-half (HF/camelid) order."""
    rows = w.shape[0]
    e = rows // n_heads
    return w.reshape(n_heads, e // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(rows, *w.shape[1:])


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of interleaved_to_half (what llama.cpp's converter and Meta's layout expect)."""
    rows = w.shape[0]
    e = rows // n_heads
    return w.reshape(n_heads, 2, e // 2, *w.shape[1:]).transpose(1, 2).reshape(rows, *w.shape[1:])
