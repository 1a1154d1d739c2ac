"""Meta's original Llama downloads: params.json + consolidated.NN.pth shards + tokenizer.model.

Meta split each weight across its model-parallel ranks: column-parallel linears (wq, wk, wv, w1, w3,
output) on dim 0, row-parallel ones (wo, w2) on dim 1, Llama 1/2's ParallelEmbedding on dim 1 and
Llama 3's VocabParallelEmbedding on dim 0; norms are replicated. Tensor names are already camelid's;
Q/K rows are in interleaved order and are converted to rotate-half once, in layout.py.

Shards are memory-mapped and unpickled with `weights_only=True`: a file that needs anything but
tensors to unpickle is refused, and nothing in it runs.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from ..config import ModelConfig, RopeScaling, ffn_hidden_dim
from ..errors import FormatError, first_line
from ..tokenizer import Tokenizer
from . import Checkpoint, LazyTensor
from .layout import interleaved_to_half
from .tokenizers_io import from_sentencepiece, from_tiktoken, is_tiktoken_file, read_json

COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
REPLICATED = ("attention_norm.weight", "ffn_norm.weight", "norm.weight")
IGNORED = {"rope.freqs"}  # Llama 1/2 saved their RoPE table; camelid computes it
_NAME = re.compile(r"^(tok_embeddings\.weight|norm\.weight|output\.weight|layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123]"
                   r"|attention_norm|ffn_norm)\.weight)$")
_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


LLAMA_3_2_SHAPES = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama 3.2 1B and 3B


def _default_rope_factor(params: dict) -> float:
    """params.json gives no factor: Llama 3.1 uses 8; Llama 3.2 1B/3B use 32 (Meta's model card and
    transformers' conversion of Meta's folders), so a Meta folder and its HF twin agree."""
    return 32.0 if (int(params["dim"]), int(params["n_layers"])) in LLAMA_3_2_SHAPES else 8.0


def config_from_params(params: dict, vocab_size: int, tie_embeddings: bool = False,
                       where: Path | str = "params.json") -> ModelConfig:
    """A ModelConfig from Meta's params.json (vocab_size -1, as in Llama 1/2, takes the tokenizer's)."""
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        vocab = int(params.get("vocab_size", -1))
        norm_eps = float(params.get("norm_eps", 1e-5))
        scaled = bool(params.get("use_scaled_rope", False))
        if "max_seq_len" in params:
            max_seq_len = int(params["max_seq_len"])
        elif scaled:
            max_seq_len = 131072  # Llama 3.1 / 3.2
        elif vocab >= 128000:
            max_seq_len = 8192  # Llama 3
        else:
            max_seq_len = 2048 if norm_eps < 1e-5 else 4096  # Llama 1 used eps 1e-6, Llama 2 1e-5
        return ModelConfig(
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            vocab_size=vocab if vocab > 0 else vocab_size,
            hidden_dim=ffn_hidden_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
            norm_eps=norm_eps,
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=RopeScaling(factor=float(params.get("rope_scaling_factor", _default_rope_factor(params)))) if scaled else None,
            max_seq_len=max_seq_len,
            tie_embeddings=tie_embeddings,
        )
    except KeyError as e:
        raise FormatError(f"{where}: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: {e}") from None


def shard_files(folder: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, checked to be complete."""
    numbered = {}
    for p in folder.glob("consolidated.*.pth"):
        m = _SHARD.match(p.name)
        if m:
            numbered[int(m.group(1))] = p
    if not numbered:
        raise FormatError(f"{folder}: no consolidated.NN.pth weights")
    for i in range(max(numbered) + 1):
        if i not in numbered:
            present = f"{len(numbered)} of {max(numbered) + 1} present"
            raise FormatError(f"{folder}: shard consolidated.{i:02d}.pth is missing ({present})")
    return [numbered[i] for i in range(len(numbered))]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd dict of tensors, memory-mapped; anything that is not plain weights is refused unrun."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip file
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise FormatError(f"{path}: not a plain weights file; refusing to unpickle it{what}") from None
    except Exception as e:
        reason = first_line(e)
        raise FormatError(f"{path}: cannot read it as PyTorch weights ({reason})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FormatError(f"{path}: not a dict of named tensors")
    return obj


def split_dim(name: str, shard_shape: tuple[int, ...], dim: int) -> int | None:
    """The dimension Meta split `name` on across shards (None: replicated)."""
    if name.endswith(REPLICATED):
        return None
    if name.endswith(COLUMN_PARALLEL):
        return 0
    if name.endswith(ROW_PARALLEL):
        return 1
    if name == "tok_embeddings.weight":  # Llama 3 splits the vocabulary, Llama 1/2 the model dim
        return 0 if shard_shape[1] == dim else 1
    raise FormatError(f"unexpected tensor {name!r} in a Meta checkpoint")


def _merged_shape(name: str, shapes: list[tuple[int, ...]], axis: int | None, where: Path) -> tuple[int, ...]:
    first = shapes[0]
    if axis is None:
        if any(s != first for s in shapes):
            raise FormatError(f"{where}: replicated tensor {name} has different shapes across shards: {shapes}")
        return first
    others = [s[:axis] + s[axis + 1:] for s in shapes]
    if any(len(s) != len(first) or o != others[0] for s, o in zip(shapes, others, strict=True)):
        raise FormatError(f"{where}: tensor {name} shards do not fit together on dim {axis}: {shapes}")
    return first[:axis] + (sum(s[axis] for s in shapes),) + first[axis + 1:]


def _loader(shards: list[dict[str, torch.Tensor]], name: str, axis: int | None, heads: int | None):
    def load() -> torch.Tensor:
        t = shards[0][name] if axis is None or len(shards) == 1 else torch.cat([s[name] for s in shards], dim=axis)
        return interleaved_to_half(t, heads) if heads is not None else t

    return load


def read_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.model: tiktoken ranks (Llama 3) or SentencePiece (Llama 1/2). The chat format is the
    built-in one its special tokens call for (camelid.chat picks llama-3 or llama-2)."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise FormatError(f"{folder}: no tokenizer.model beside params.json")
    return from_tiktoken(path) if is_tiktoken_file(path) else from_sentencepiece(path)


def read(folder: Path) -> Checkpoint:
    """Read a Meta original-format Llama folder."""
    params = read_json(folder / "params.json")
    files = shard_files(folder)
    shards = [load_weights(f) for f in files]
    names = set(shards[0]) - IGNORED
    for f, s in zip(files[1:], shards[1:], strict=True):
        if set(s) - IGNORED != names:
            odd = sorted((set(s) - IGNORED) ^ names)
            raise FormatError(f"{f}: holds different tensors than {files[0].name} (e.g. {odd[0]})")
    bad = sorted(n for n in names if not _NAME.match(n))
    if bad:
        raise FormatError(f"{files[0]}: unexpected tensor {bad[0]!r} in a Meta checkpoint")
    tokenizer = read_tokenizer(folder)
    config = config_from_params(params, tokenizer.vocab_size, "output.weight" not in names, folder / "params.json")
    tensors: dict[str, LazyTensor] = {}
    for name in sorted(names):
        shapes = [tuple(s[name].shape) for s in shards]
        axis = split_dim(name, shapes[0], config.dim) if len(shards) > 1 else None
        heads = config.n_heads if name.endswith("wq.weight") else config.n_kv_heads if name.endswith("wk.weight") else None
        shape = _merged_shape(name, shapes, axis, folder)
        tensors[name] = LazyTensor(shape, str(shards[0][name].dtype).removeprefix("torch."), _loader(shards, name, axis, heads))
    tokenizer_kind = "tiktoken" if is_tiktoken_file(folder / "tokenizer.model") else "sentencepiece"
    info = {"name": folder.name, "shards": len(files), "tokenizer": tokenizer_kind,
            "tensor_types": sorted({t.dtype for t in tensors.values()})}
    return Checkpoint(config, tensors, tokenizer, "meta", folder, info)
