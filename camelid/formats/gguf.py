"""GGUF reader (architecture `llama`), on llama.cpp's own `gguf` package.

Metadata becomes a ModelConfig, the tokenizer arrays a Tokenizer, and each tensor a LazyTensor that
is dequantized to float32 only when loaded (float32 tensors come straight from the memory map).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, RopeScaling
from ..errors import FormatError, UnsupportedModelError, first_line
from ..tokenizer import Tokenizer, build_bpe, build_spm
from . import Checkpoint, LazyTensor
from .layout import interleaved_to_half

# GGUF tensor name -> canonical name ({i} is the layer)
NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    # llama4 mixture-of-experts layers
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.feed_forward.router.weight",
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.feed_forward.experts.w1",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.feed_forward.experts.w2",
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.feed_forward.experts.w3",
    "blk.{i}.ffn_gate_shexp.weight": "layers.{i}.feed_forward.shared.w1.weight",
    "blk.{i}.ffn_down_shexp.weight": "layers.{i}.feed_forward.shared.w2.weight",
    "blk.{i}.ffn_up_shexp.weight": "layers.{i}.feed_forward.shared.w3.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), c) for g, c in NAMES.items()]
IGNORED = {"rope_freqs.weight"}  # folded into the config's RoPE scaling


def canonical_name(gguf_name: str) -> str | None:
    for pattern, canon in _PATTERNS:
        m = pattern.match(gguf_name)
        if m:
            return canon.replace("{i}", m.group(1)) if m.groups() else canon
    return None


def gguf_name(canonical: str) -> str:
    """Inverse of canonical_name (for writers)."""
    for g, c in NAMES.items():
        pattern = "^" + re.escape(c).replace(r"\{i\}", r"(\d+)") + "$"
        m = re.match(pattern, canonical)
        if m:
            return g.replace("{i}", m.group(1)) if m.groups() else g
    raise KeyError(canonical)


def _reader_class():
    from gguf import GGUFReader

    class Reader(GGUFReader):
        """gguf's reader over a plain ndarray view of its memory map: the same bytes, the same lazy paging, but
        slicing skips np.memmap's per-view bookkeeping, which made parsing a 49k-token vocabulary take seconds."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader


class _Tensor:
    """What read() needs of one tensor: name, ggml type, GGUF dims, and its bytes as a view of the memory map."""

    def __init__(self, name: str, tensor_type, shape: np.ndarray, data: np.ndarray) -> None:
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


class _Meta:
    """A GGUF file's metadata values (key -> contents) and tensors. Parsing the vocabulary's fields takes most of
    a second, so what is parsed is kept in a cache file beside the model store, keyed by the file's path, size
    and modification time; a later read maps the file and takes the values from the cache."""

    def __init__(self, path: Path, fields: dict, broken: dict[str, str], tensors: list[_Tensor], mapping=None) -> None:
        self.path, self.fields, self.broken, self.tensors = path, fields, broken, tensors
        self.mapping = mapping  # the file's mmap.mmap, for drop_pages


def _mapping_of(array: np.ndarray):
    """The mmap.mmap under a view of an np.memmap, or None."""
    while array is not None:
        if isinstance(array, np.memmap):
            return getattr(array, "_mmap", None)
        array = array.base if isinstance(array.base, np.ndarray) else None
    return None


def _dropper(mapping):
    """A function that hands the pages of the file's mapping that this process touched back (MADV_DONTNEED): they
    stay in the page cache, and a tensor still viewing them (a norm weight) reads them again on its next use. After
    a load has converted the weights, the file's pages would otherwise count in the process's RSS for good."""
    import mmap

    def drop() -> None:
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):  # no madvise here (Windows), or the map is closed
            pass

    return drop if mapping is not None and hasattr(mmap, "MADV_DONTNEED") else None


CACHE_VERSION = 1


def _cache_file(path: Path) -> Path | None:
    import hashlib

    from ..store import home

    try:
        st = path.resolve().stat()
    except OSError:
        return None
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_VERSION}"
    return home() / "cache" / "gguf" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pickle"


def _map(path: Path, layout: list[tuple]) -> list[_Tensor]:
    from gguf import GGMLQuantizationType

    mapped = np.memmap(path, mode="r")
    whole = mapped.view(np.ndarray)
    out = []
    for name, kind, dims, offset, dtype, np_shape in layout:
        count = int(np.prod(np_shape))
        data = whole[offset : offset + count * np.dtype(dtype).itemsize].view(dtype).reshape(np_shape)
        out.append(_Tensor(name, GGMLQuantizationType(kind), np.asarray(dims), data))
    return out, getattr(mapped, "_mmap", None)


def _open(path: Path) -> _Meta:
    import pickle

    cache = _cache_file(path)
    if cache is not None and cache.is_file():
        try:
            with open(cache, "rb") as f:
                fields, broken, layout = pickle.load(f)
            return _Meta(path, fields, broken, *_map(path, layout))
        except Exception:  # a damaged or foreign cache file: parse the model file again
            pass
    try:
        reader = _reader_class()(path)
    except Exception as e:  # the reader raises many kinds on damaged files
        reason = first_line(e)
        raise FormatError(f"{path}: corrupt or truncated GGUF file ({reason})") from None
    fields, broken = {}, {}
    for key, f in reader.fields.items():
        try:
            fields[key] = f.contents()
        except Exception as e:
            broken[key] = str(e)
    tensors = [_Tensor(t.name, t.tensor_type, np.asarray(t.shape), t.data) for t in reader.tensors]
    layout = [(t.name, int(t.tensor_type), t.shape.tolist(), int(t.data_offset), t.data.dtype.str, t.data.shape)
              for t in reader.tensors]
    if cache is not None:
        try:  # written whole or not at all
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                pickle.dump((fields, broken, layout), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, cache)
        except OSError:
            pass
    return _Meta(path, fields, broken, tensors, _mapping_of(reader.data))


def _field(reader: _Meta, key: str, default=None):
    if key in reader.broken:
        raise FormatError(f"{reader.path}: cannot read metadata {key} ({reader.broken[key]})")
    v = reader.fields.get(key)
    return default if v is None else v


def _require(reader: _Meta, key: str):
    v = _field(reader, key)
    if v is None:
        raise FormatError(f"{reader.path}: missing metadata key {key}")
    return v


def _rope_scaling(reader, rope_freqs, head_dim: int, theta: float) -> RopeScaling | None:
    kind = _field(reader, "llama.rope.scaling.type", "none")
    if kind not in ("none", "llama3", None):
        raise UnsupportedModelError(f"{reader.path}: RoPE scaling type {kind!r} is not supported")
    if rope_freqs is None:
        return None
    # Llama 3.1/3.2 GGUFs store the per-frequency divisors; recover the standard llama3 parameters
    from ..model import rope_frequencies

    factors = np.asarray(rope_freqs.data, dtype=np.float64).reshape(-1)
    scaling = RopeScaling(factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    plain = rope_frequencies(head_dim, theta, None).double().numpy()
    scaled = rope_frequencies(head_dim, theta, scaling).double().numpy()
    if not np.allclose(plain / scaled, factors, rtol=1e-3):
        raise UnsupportedModelError(f"{reader.path}: rope_freqs do not match Llama 3.1 scaling with factor {scaling.factor}")
    return scaling


def read_config(reader, n_vocab: int) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch == "llama4":
        from .gguf_llama4 import read_config as read_llama4

        return read_llama4(reader, n_vocab)
    if arch != "llama":
        raise UnsupportedModelError(f"{reader.path}: architecture {arch!r} is not supported (camelid runs 'llama' and 'llama4')")
    n_heads = int(_require(reader, "llama.attention.head_count"))
    dim = int(_require(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.attention.key_length", dim // n_heads))
    theta = float(_field(reader, "llama.rope.freq_base", 10000.0))
    tensors = {t.name: t for t in reader.tensors}
    return ModelConfig(
        dim=dim,
        n_layers=int(_require(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        vocab_size=int(_field(reader, "llama.vocab_size", n_vocab)),
        hidden_dim=int(_require(reader, "llama.feed_forward_length")),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, tensors.get("rope_freqs.weight"), head_dim, theta),
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        tie_embeddings="output.weight" not in tensors,
        head_dim_override=head_dim if head_dim != dim // n_heads else None,
    )


def read_tokenizer(reader) -> Tokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise FormatError(f"{reader.path}: no tokenizer in the file (tokenizer.ggml.model/tokens missing)")
    types = _field(reader, "tokenizer.ggml.token_type")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    stops = [_field(reader, "tokenizer.ggml.eot_token_id"), _field(reader, "tokenizer.ggml.eom_token_id")]
    template = _field(reader, "tokenizer.chat_template")
    if model == "gpt2":
        merges = _field(reader, "tokenizer.ggml.merges") or []
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
        return build_bpe(tokens, merges, types, pre, bos, eos, add_bos, stops, template)
    if model == "llama":
        scores = _field(reader, "tokenizer.ggml.scores")
        if scores is None or types is None:
            raise FormatError(f"{reader.path}: SentencePiece vocabulary without scores or token types")
        return build_spm(tokens, scores, types, bos, eos, _field(reader, "tokenizer.ggml.unknown_token_id"),
                         bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
                         bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)), stops, template)
    raise UnsupportedModelError(f"{reader.path}: tokenizer model {model!r} is not supported (expected 'gpt2' or 'llama')")


def _loader(tensor, permute_heads: int | None):
    def load() -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        if tensor.tensor_type == GGMLQuantizationType.F32:
            with warnings.catch_warnings():  # a read-only view of the memory map: never written to
                warnings.simplefilter("ignore")
                t = torch.from_numpy(np.asarray(tensor.data)).reshape(tuple(reversed(tensor.shape.tolist())))
        else:
            try:
                t = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False))
            except NotImplementedError:
                raise UnsupportedModelError(f"tensor {tensor.name}: type {tensor.tensor_type.name} is not supported") from None
        if permute_heads is not None:
            t = interleaved_to_half(t, permute_heads)
        return t

    return load


FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def _raw(tensor, permute_heads: int | None):
    def raw() -> tuple[str, np.ndarray]:
        rows = np.asarray(tensor.data)  # uint8 [rows, bytes per row], a view of the memory map
        if permute_heads is not None:  # rows are whole blocks along K: the Q/K row order converts losslessly
            rows = interleaved_to_half(torch.from_numpy(np.array(rows)), permute_heads).numpy()
        return tensor.tensor_type.name, rows

    return raw


def read(path: Path) -> Checkpoint:
    reader = _open(path)
    tokenizer = read_tokenizer(reader)
    config = read_config(reader, tokenizer.vocab_size)
    tensors: dict[str, LazyTensor] = {}
    for t in reader.tensors:
        if t.name in IGNORED:
            continue
        name = canonical_name(t.name)
        if name is None:
            raise UnsupportedModelError(f"{path}: unexpected tensor {t.name!r} for a llama model")
        heads = config.n_heads if name.endswith("wq.weight") else config.n_kv_heads if name.endswith("wk.weight") else None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        raw = _raw(t, heads) if t.tensor_type.name not in FLOAT_TYPES else None
        if len(shape) == 3:  # llama4 experts [X,rows,K]: raw gives the blocks [X,rows,bytes] (a memory-map view)
            raw = _raw(t, None) if raw is not None else None
        tensors[name] = LazyTensor(shape, t.tensor_type.name, _loader(t, heads), raw)
    file_type = _field(reader, "general.file_type")
    from gguf import LlamaFileType

    try:
        quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = str(file_type)
    info = {"name": _field(reader, "general.name"), "quantization": quant,
            "tensor_types": sorted({t.dtype for t in tensors.values()}), "gguf_version": _field(reader, "GGUF.version")}
    return Checkpoint(config, tensors, tokenizer, "gguf", path, info, drop_pages=_dropper(reader.mapping))
