"""GGUF writer (architecture `llama`): a Checkpoint as a file llama.cpp loads, in F32, F16, Q8_0, Q4_0 or Q4_1.

Written the way llama.cpp's convert_hf_to_gguf.py writes a Llama: `llama.*` metadata from the ModelConfig,
GGUF tensor names, Q/K rows back in the interleaved order, norms in F32, a tied embedding stored once,
Llama 3.1 RoPE scaling as the `rope_freqs.weight` factors tensor. 2-D tensors whose rows are not a whole
number of blocks stay F16 (as llama.cpp's quantizer leaves them unquantized); for 4-bit types the output
layer (the embedding when tied) is Q8_0, as llama.cpp keeps it at higher precision.

The vocabulary: from a GGUF source every `tokenizer.*` field is copied verbatim; otherwise it is derived
from the source folder's tokenizer (byte-level BPE: tokens, types, merges and the pre-tokenizer's name;
SentencePiece: pieces, scores and types from the folder's tokenizer.model).

Tensors are streamed: the header is written from the shapes, then each tensor is loaded, converted,
written and dropped, so memory holds one tensor at a time. The file appears at its path only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import UnsupportedModelError
from . import Checkpoint
from .gguf import gguf_name
from .layout import half_to_interleaved

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def _ggml_type(kind: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[kind]


def _file_type(kind: str) -> int:
    from gguf import LlamaFileType as F

    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1}[kind])


def rope_factors(ckpt: Checkpoint) -> np.ndarray | None:
    """llama.cpp's `rope_freqs.weight` for Llama 3.1 scaling: each frequency's divisor; None without scaling."""
    from ..model import rope_frequencies

    cfg = ckpt.config
    if cfg.rope_factors:
        return np.asarray(cfg.rope_factors, dtype=np.float32)
    if cfg.rope_scaling is None:
        return None
    plain = rope_frequencies(cfg.head_dim, cfg.rope_theta, None).double()
    scaled = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).double()
    return (plain / scaled).float().numpy()


def _plan(ckpt: Checkpoint, kind: str) -> list[tuple[str, str, tuple[int, ...], object]]:
    """(canonical name, GGUF name, shape, ggml type) for every tensor, in writing order."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    target = _ggml_type(kind)
    block = GGML_QUANT_SIZES[target][0]

    def key(name: str) -> tuple:
        if name.startswith("layers."):
            return (1, int(name.split(".")[1]), name)
        return (0 if name == "tok_embeddings.weight" else 2, 0, name)

    output = "tok_embeddings.weight" if ckpt.config.tie_embeddings else "output.weight"
    plan = []
    for name in sorted(ckpt.tensors, key=key):
        shape = tuple(ckpt.tensors[name].shape)
        if len(shape) == 1 or name.endswith("feed_forward.router.weight"):
            qtype = Q.F32  # norms, and the MoE router (llama.cpp never quantizes expert gating)
        elif shape[-1] % block:
            qtype = Q.F16
        elif name == output and target in (Q.Q4_0, Q.Q4_1):
            qtype = Q.Q8_0  # llama.cpp keeps the output layer at 6+ bits (Q6_K); Q8_0 is the nearest gguf-py writes
        else:
            qtype = target
        plan.append((name, gguf_name(name), shape, qtype))
    return plan


def _encode(ckpt: Checkpoint, name: str, qtype) -> np.ndarray:
    """The tensor as stored: float32/float16 array, or uint8 blocks [rows, bytes per row]."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    cfg = ckpt.config
    t = ckpt.tensors[name].load().float()
    if name.endswith("attention.wq.weight"):
        t = half_to_interleaved(t, cfg.n_heads)
    elif name.endswith("attention.wk.weight"):
        t = half_to_interleaved(t, cfg.n_kv_heads)
    a = t.contiguous().numpy()
    if qtype == Q.F32:
        return a.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return a.astype(np.float16)
    return quantize(a, qtype)


def write_gguf(ckpt: Checkpoint, out: str | os.PathLike, kind: str,
               progress: Callable[[str, int, int], None] | None = None, overwrite: bool = False) -> dict:
    """Write `ckpt` to `out` as a llama GGUF of type `kind` (f32, f16, q8_0, q4_0, q4_1); a summary dict.

    progress(name, done, total) is called after each tensor; overwrite=True replaces an existing `out`.
    """
    import gguf

    if kind not in TYPES:
        raise ValueError(f"GGUF type must be one of {', '.join(TYPES)}, got {kind!r}")
    out = Path(out)
    cfg = ckpt.config
    vocab = gguf_vocab(ckpt)  # first: a vocabulary that cannot be written fails before any work
    plan = _plan(ckpt, kind)
    factors = rope_factors(ckpt)
    tmp = out.with_name(out.name + ".part")
    if cfg.arch not in ("llama", "llama4"):
        raise UnsupportedModelError(f"architecture {cfg.arch!r} cannot be written as GGUF")
    if cfg.arch == "llama4":
        from .gguf_llama4 import moe_step, write_keys

        moe_step(cfg)  # refuses before any file is made
    w = gguf.GGUFWriter(str(tmp), cfg.arch)
    try:
        w.add_name(str(ckpt.info.get("name") or ckpt.path.stem))
        w.add_block_count(cfg.n_layers)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim != cfg.dim // cfg.n_heads:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.arch == "llama4":
            write_keys(w, cfg)
        w.add_file_type(_file_type(kind))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, (value, vtype, sub_type) in vocab.items():
            w.add_key_value(key, value, vtype, sub_type)
        if factors is not None:
            w.add_tensor_info("rope_freqs.weight", factors.shape, np.dtype(np.float32), factors.nbytes)
        for _, gname, shape, qtype in plan:
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                w.add_tensor_info(gname, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if factors is not None:
            w.write_tensor_data(factors)
        for i, (name, _, _, qtype) in enumerate(plan):
            w.write_tensor_data(_encode(ckpt, name, qtype))
            if progress:
                progress(name, i + 1, len(plan))
        w.close()
        if out.is_dir() and overwrite:
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    types: dict[str, int] = {}
    for *_, qtype in plan:
        types[qtype.name] = types.get(qtype.name, 0) + 1
    return {"path": str(out), "format": "gguf", "type": kind.upper(), "tensor_types": types, "bytes": out.stat().st_size}


# --- the vocabulary -------------------------------------------------------------------------------------

Fields = dict[str, tuple[object, object, object]]  # key -> (value, GGUFValueType, array item type or None)


def gguf_vocab(ckpt: Checkpoint) -> Fields:
    """The tokenizer.* fields to write for `ckpt`."""
    if ckpt.format == "gguf":
        return _copied_vocab(ckpt.path)
    if ckpt.tokenizer.kind == "bpe":
        return _bpe_vocab(ckpt)
    return _spm_vocab(ckpt)


def _copied_vocab(path: Path) -> Fields:
    from gguf import GGUFValueType

    from .gguf import _open

    reader = _open(path)
    fields: Fields = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = GGUFValueType(f.types[0])
            sub = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
            fields[key] = (f.contents(), vtype, sub)
    return fields


def _common(ckpt: Checkpoint, fields: Fields, tokens: list[str]) -> None:
    """Special ids, BOS rule and chat template (shared by both vocabulary kinds)."""
    from gguf import GGUFValueType as V

    tok = ckpt.tokenizer
    if tok.bos_id is not None:
        fields["tokenizer.ggml.bos_token_id"] = (int(tok.bos_id), V.UINT32, None)
    if tok.eos_id is not None:
        fields["tokenizer.ggml.eos_token_id"] = (int(tok.eos_id), V.UINT32, None)
    others = sorted(i for i in tok.stop_ids if i != tok.eos_id and i < len(tokens))
    eom = [i for i in others if tokens[i] == "<|eom_id|>"]
    eot = [i for i in others if tokens[i] != "<|eom_id|>"]
    if eot:
        fields["tokenizer.ggml.eot_token_id"] = (eot[0], V.UINT32, None)
    if eom:
        fields["tokenizer.ggml.eom_token_id"] = (eom[0], V.UINT32, None)
    fields["tokenizer.ggml.add_bos_token"] = (bool(tok.add_bos), V.BOOL, None)
    if tok.chat_template:
        fields["tokenizer.chat_template"] = (tok.chat_template, V.STRING, None)


def _pad(tokens: list[str | None], types: list[int], n: int) -> None:
    """Holes and a vocabulary shorter than the embedding become [PADi] tokens (as llama.cpp's converter does)."""
    tokens.extend([None] * (n - len(tokens)))
    types.extend([TOKEN_UNUSED] * (n - len(types)))
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", TOKEN_UNUSED


def _pre_name(backend) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE pre-tokenizer camelid knows."""
    from ..tokenizer import GPT2_PATTERN, LLAMA3_PATTERN, LLAMA4_PATTERN

    spec = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    patterns = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if kinds == ["Split", "ByteLevel"] and patterns == [LLAMA3_PATTERN]:
        return "llama-bpe"
    if kinds == ["Split", "ByteLevel"] and patterns == [LLAMA4_PATTERN]:
        return "llama4"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Split", "ByteLevel"] and patterns == [GPT2_PATTERN]:
        return "gpt2"
    raise UnsupportedModelError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp "
                                "name camelid knows; use int8/int4 output or llama.cpp's converter")


def _bpe_vocab(ckpt: Checkpoint) -> Fields:
    from gguf import GGUFValueType as V

    tok = ckpt.tokenizer
    backend = tok.backend
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"{ckpt.path}: tokenizer model {model.get('type')!r} cannot be written as a GGUF vocabulary")
    added = backend.get_added_tokens_decoder()
    n = max(ckpt.config.vocab_size, backend.get_vocab_size(with_added_tokens=True))
    tokens: list[str | None] = [backend.id_to_token(i) for i in range(backend.get_vocab_size(with_added_tokens=True))]
    types = [TOKEN_NORMAL] * len(tokens)
    for i, a in added.items():
        if i < len(types):
            types[i] = TOKEN_CONTROL if a.special or i in tok.special_ids else TOKEN_USER_DEFINED
    _pad(tokens, types, n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: Fields = {
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.pre": (_pre_name(backend), V.STRING, None),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
    }
    if merges:
        fields["tokenizer.ggml.merges"] = (merges, V.ARRAY, V.STRING)
    _common(ckpt, fields, tokens)
    return fields


def _spm_vocab(ckpt: Checkpoint) -> Fields:
    """A SentencePiece vocabulary needs the scores: only the original tokenizer.model has them."""
    from gguf import GGUFValueType as V

    model_file = ckpt.path / "tokenizer.model"
    if not model_file.is_file():
        raise UnsupportedModelError(f"{ckpt.path}: a SentencePiece vocabulary can only be written to GGUF from its "
                                    "tokenizer.model (this folder has only tokenizer.json); use int8/int4 output")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens: list[str | None] = []
    scores, types = [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                     else 6 if sp.is_byte(i) else TOKEN_NORMAL)
    backend = ckpt.tokenizer.backend
    for i, a in backend.get_added_tokens_decoder().items():  # tokens an HF folder adds after the pieces
        if i >= len(tokens):
            tokens.extend([None] * (i + 1 - len(tokens)))
            types.extend([TOKEN_UNUSED] * (i + 1 - len(types)))
            tokens[i], types[i] = a.content, TOKEN_CONTROL if a.special else TOKEN_USER_DEFINED
    _pad(tokens, types, max(ckpt.config.vocab_size, len(tokens)))
    scores.extend([-1000.0] * (len(tokens) - len(scores)))
    tok = ckpt.tokenizer
    fields: Fields = {
        "tokenizer.ggml.model": ("llama", V.STRING, None),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.scores": (scores, V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.add_space_prefix": (bool(tok.strip_leading_space), V.BOOL, None),
    }
    if sp.unk_id() >= 0:
        fields["tokenizer.ggml.unknown_token_id"] = (int(sp.unk_id()), V.UINT32, None)
    _common(ckpt, fields, tokens)
    return fields

