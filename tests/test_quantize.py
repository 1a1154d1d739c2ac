"""`camelid quantize`: GGUF and int8/int4 writers, read back by camelid and by llama.cpp, and the quality report.

Tiny random models are made here (GGUF with tests/gguf_factory.py, HF folders with test_formats_hf's helpers).
Independent checks: gguf-py's own quantize/dequantize for the expected weights, llama.cpp's logits and
tokenization on the written file, llama.cpp's converter's rope factors, the float model's logits.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import require_llama_cpp
from gguf import GGMLQuantizationType as GQ
from gguf_factory import Spec, byte_level_vocab, llama3_rope_factors, write_gguf

from camelid.cli import main
from camelid.config import RopeScaling
from camelid.eval.quality import compare, compare_checkpoints
from camelid.formats import read, write
from camelid.formats.hf import unpack_int4
from camelid.formats.hf_write import pack_int4
from camelid.loader import build_model

SPEC = Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, context_length=128)
IDS = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101, 32, 99, 97, 116]


def vocab_with_merges():
    """The factory's byte-level vocabulary plus a few merges (llama.cpp refuses a gpt2 vocabulary without any)."""
    v = byte_level_vocab()
    v.merges = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t"]
    v.tokens += ["Ġt", "he", "Ġthe", "Ġc", "at"]
    v.types += [1] * 5
    return v


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny.gguf"
    weights = write_gguf(path, SPEC, vocab_with_merges(), GQ.F32, chat_template="{{ messages[0]['content'] }}")
    return path, weights


def logits(path_or_ckpt, ids=IDS) -> torch.Tensor:
    ckpt = read(path_or_ckpt) if not hasattr(path_or_ckpt, "tensors") else path_or_ckpt
    with torch.no_grad():
        return build_model(ckpt)(torch.tensor([ids]))[0]


def gguf_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


# --- GGUF output -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_gguf_round_trip_within_quantization(tmp_path, tiny_gguf, kind):
    src, weights = tiny_gguf
    out = tmp_path / f"tiny-{kind}.gguf"
    summary = write(read(src), out, kind)
    assert summary["type"] == kind.upper()
    back = read(out)
    assert back.config == read(src).config
    for name, w in weights.items():
        got = back.tensors[name].load().numpy()
        if w.ndim == 1:  # norms stay F32, exactly
            assert back.tensors[name].dtype == "F32"
            np.testing.assert_array_equal(got, w)
        else:  # gguf-py's own round trip of the HF-layout weights: quantization is per row, so the Q/K
            # row permutation there and back must leave exactly this
            qtype = GQ.Q8_0 if name == "output.weight" else GQ[kind.upper()]  # 4-bit files keep the output at Q8_0
            assert back.tensors[name].dtype == qtype.name
            expected = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
            np.testing.assert_array_equal(got, expected)
            assert np.abs(got - w).max() < 0.2 * np.abs(w).max()


def test_same_type_requantization_is_lossless(tmp_path):
    """Q4_1 and Q8_0 values requantized to their own type come back unchanged (min/max and absmax land on the
    same grid): a check of the whole dequantize -> permute -> quantize -> read path that needs no tolerance."""
    for qt in (GQ.Q4_1, GQ.Q8_0):
        src = tmp_path / f"{qt.name}.gguf"
        write_gguf(src, SPEC, vocab_with_merges(), qt)
        out = tmp_path / f"{qt.name}-again.gguf"
        write(read(src), out, qt.name.lower())
        a, b = read(src), read(out)
        for name, t in a.tensors.items():
            if name != "output.weight":  # (4-bit files keep it at Q8_0)
                torch.testing.assert_close(b.tensors[name].load(), t.load(), rtol=0, atol=1e-6 * t.load().abs().max().item())


def test_gguf_f16_exact_and_metadata(tmp_path, tiny_gguf):
    src, weights = tiny_gguf
    out = tmp_path / "tiny-f16.gguf"
    write(read(src), out, "f16")
    back = read(out)
    for name, w in weights.items():
        expected = w if w.ndim == 1 else w.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(back.tensors[name].load().numpy(), expected)
    # the vocabulary is copied verbatim from a GGUF source
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)
    keys = {k for k in a.fields if k.startswith("tokenizer.")}
    assert keys and keys == {k for k in b.fields if k.startswith("tokenizer.")}
    for k in keys:
        assert a.fields[k].contents() == b.fields[k].contents(), k
    assert b.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_F16)
    torch.testing.assert_close(logits(out), logits(src), atol=2e-2, rtol=1e-2)


def test_odd_rows_stay_f16_and_tied_written_once(tmp_path):
    spec = Spec(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96, tied=True)  # 48, 96: not multiples of 32
    src = tmp_path / "odd.gguf"
    write_gguf(src, spec, vocab_with_merges())
    out = tmp_path / "odd-q8.gguf"
    write(read(src), out, "q8_0")
    types = gguf_types(out)
    assert "output.weight" not in types
    assert types["token_embd.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"  # K = 96
    assert types["blk.0.ffn_up.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert read(out).config.tie_embeddings


@pytest.mark.parametrize("tied", [False, True])
def test_4bit_files_keep_the_output_layer_at_q8_0(tmp_path, tied):
    src = tmp_path / "src.gguf"
    write_gguf(src, Spec(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128, tied=tied), vocab_with_merges())
    write(read(src), tmp_path / "q4.gguf", "q4_1")
    types = gguf_types(tmp_path / "q4.gguf")
    assert types["token_embd.weight"] == ("Q8_0" if tied else "Q4_1")
    assert types.get("output.weight") == (None if tied else "Q8_0")
    assert types["blk.0.attn_q.weight"] == "Q4_1"


def test_rope_scaling_written_as_llama_cpp_factors(tmp_path, tiny_gguf):
    from camelid.formats.gguf_write import rope_factors

    src, _ = tiny_gguf
    ckpt = read(src)
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    ckpt.config = type(ckpt.config)(**{**ckpt.config.__dict__, "rope_theta": 500000.0, "rope_scaling": scaling})
    expected = llama3_rope_factors(SPEC.head_dim, 500000.0)  # llama.cpp's converter, re-stated
    np.testing.assert_allclose(rope_factors(ckpt), expected, rtol=1e-5)
    out = tmp_path / "scaled.gguf"
    write(ckpt, out, "f16")
    r = gguf.GGUFReader(out)
    stored = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    np.testing.assert_allclose(np.asarray(stored.data), expected, rtol=1e-5)
    assert read(out).config.rope_scaling == scaling


def _llama_cpp(path, n_ctx=128):
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, seed=0)


def _llama_cpp_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("kind,tol", [("f16", 0.005), ("q8_0", 0.04), ("q4_0", 0.04)])
def test_llama_cpp_agrees_with_camelid(tmp_path, tiny_gguf, kind, tol):
    """llama.cpp's logits on the written file equal camelid's on the same file (llama.cpp rounds activations
    to f16 / q8_0 in its products: hence the tolerance, relative to the logits' range)."""
    src, _ = tiny_gguf
    out = tmp_path / f"t-{kind}.gguf"
    write(read(src), out, kind)
    llm = _llama_cpp(out)
    theirs = _llama_cpp_logits(llm, IDS)
    ours = logits(out).numpy()
    assert np.abs(theirs - ours).max() < tol * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9  # greedy choices


# --- from a Hugging Face folder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_formats_hf import llama_config, random_model, save_folder, train_bpe

    tok = train_bpe()
    model = random_model(llama_config(tok.get_vocab_size()))
    with torch.no_grad():  # random_model's weights are large; tame them so quantization error stays moderate
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(0.5)
    return save_folder(tmp_path_factory.mktemp("hf") / "m", model, tok)


def hf_ids(folder) -> list[int]:
    from test_formats_hf import TEXT

    return read(folder).tokenizer.encode(" ".join(TEXT[:3]), bos=True)[:60]


def test_hf_to_gguf_loads_in_llama_cpp(tmp_path, hf_folder):
    from test_formats_hf import PROBE, TEXT

    out = tmp_path / "hf-f16.gguf"
    write(read(hf_folder), out, "f16")
    r = gguf.GGUFReader(out)
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    ours = read(out).tokenizer
    src_tok = read(hf_folder).tokenizer
    llm = _llama_cpp(out)
    for text in [PROBE, *TEXT]:
        assert ours.encode(text, bos=True) == src_tok.encode(text, bos=True)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == src_tok.encode(text, bos=True), text
    assert llm.token_bos() == src_tok.bos_id and llm.token_eos() == src_tok.eos_id
    ids = hf_ids(hf_folder)
    theirs = _llama_cpp_logits(llm, ids)
    ref = logits(hf_folder, ids).numpy()
    assert np.abs(theirs - ref).max() < 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("kind,max_rel", [("int8", 0.02), ("int4", 0.15)])
def test_int_folder_round_trip(tmp_path, hf_folder, kind, max_rel):
    from safetensors import safe_open

    out = tmp_path / kind
    write(read(hf_folder), out, kind)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "camelid"
    assert cfg["quantization_config"]["bits"] == (8 if kind == "int8" else 4)
    f = safe_open(str(out / "model.safetensors"), framework="pt")
    keys = set(f.keys())
    base = "model.layers.0.mlp.down_proj"
    assert f"{base}.weight" not in keys and f"{base}.qweight" in keys
    q, scales = f.get_tensor(f"{base}.qweight"), f.get_tensor(f"{base}.scales")
    n, k = 64, 96
    if kind == "int8":
        assert q.dtype == torch.int8 and tuple(q.shape) == (n, k) and tuple(scales.shape) == (n, 1)
        assert f"{base}.zeros" not in keys
    else:
        assert q.dtype == torch.uint8 and tuple(q.shape) == (n, k // 2) and tuple(scales.shape) == (n, k // 32)
        assert tuple(f.get_tensor(f"{base}.zeros").shape) == (n, k // 32)
    assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "model.norm.weight" in keys

    src, back = read(hf_folder), read(out)
    assert back.config == src.config
    lazy = back.tensors["layers.0.feed_forward.w2.weight"]
    assert lazy.dtype == kind and lazy.shape == (n, k)
    raw_kind, raw = lazy.raw()
    assert raw_kind == kind and tuple(raw["q"].shape) == (n, k)
    w = lazy.load()
    if kind == "int8":
        torch.testing.assert_close(w, raw["q"].float() * raw["scale"])
        assert raw["zero"] is None and raw["group"] == k
    else:
        assert int(raw["q"].max()) <= 15 and raw["group"] == 32
        g = raw["q"].reshape(n, k // 32, 32).float()
        torch.testing.assert_close(w, ((g - 8) * raw["scale"][..., None] + raw["zero"][..., None]).reshape(n, k))
    orig = src.tensors["layers.0.feed_forward.w2.weight"].load()
    assert (w - orig).abs().max() < max_rel * orig.abs().max()
    ids = hf_ids(hf_folder)
    a, b = logits(hf_folder, ids), logits(out, ids)
    assert (a - b).abs().max() < 4 * max_rel * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= (0.9 if kind == "int8" else 0.6)
    # the tokenizer comes back the same
    from test_formats_hf import PROBE

    assert back.tokenizer.encode(PROBE, bos=True) == src.tokenizer.encode(PROBE, bos=True)
    assert back.tokenizer.stop_ids == src.tokenizer.stop_ids and back.tokenizer.chat_template == src.tokenizer.chat_template
    # the fast path takes the integers as they are
    with torch.no_grad():
        fast = build_model(back, quant="auto")(torch.tensor([ids]))[0].float()
    assert (fast - b).abs().max() < 0.05 * b.abs().max()


def test_pack_int4_nibbles():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_int4(packed), q)


def test_quantized_folder_missing_scales(tmp_path, hf_folder):
    from safetensors.torch import load_file, save_file

    from camelid.errors import FormatError

    out = tmp_path / "i8"
    write(read(hf_folder), out, "int8")
    state = load_file(out / "model.safetensors")
    del state["model.layers.1.self_attn.o_proj.scales"]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="o_proj has no scales"):
        read(out)


def test_other_quantization_methods_refused(tmp_path, hf_folder):
    import shutil

    from camelid.errors import UnsupportedModelError

    folder = tmp_path / "gptq"
    shutil.copytree(hf_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quantization method 'gptq'"):
        read(folder)


# --- quality -----------------------------------------------------------------------------------------


def test_quality_of_identical_and_changed_models(tiny_gguf):
    src, _ = tiny_gguf
    ckpt = read(src)
    a, b = build_model(ckpt), build_model(ckpt)
    same = compare(a, b, IDS)
    assert same.kl_mean < 1e-6 and same.top1_agreement == 1.0
    assert same.source_perplexity == pytest.approx(same.quantized_perplexity, rel=1e-6)
    ffn = b.layers[0].feed_forward  # (not in place: F32 GGUF weights are views of a read-only memory map)
    ffn.w2.weight = torch.nn.Parameter(ffn.w2.weight * 3.0, requires_grad=False)
    diff = compare(a, b, IDS, window=8)  # several windows
    assert diff.kl_mean > 1e-3 and diff.windows > 1 and diff.scored == len(IDS) - 1
    from camelid.eval.perplexity import perplexity

    assert diff.source_perplexity == pytest.approx(perplexity(a, IDS, window=8).perplexity, rel=1e-6)
    assert diff.quantized_perplexity == pytest.approx(perplexity(b, IDS, window=8).perplexity, rel=1e-6)


def test_compare_checkpoints_q4_costs_more_than_q8(tmp_path, tiny_gguf):
    src, _ = tiny_gguf
    results = {}
    for kind in ("q8_0", "q4_0"):
        write(read(src), tmp_path / f"{kind}.gguf", kind)
        results[kind], same = compare_checkpoints(read(src), read(tmp_path / f"{kind}.gguf"), "Hello there, world! " * 5)
        assert same
    assert 0 < results["q8_0"].kl_mean < results["q4_0"].kl_mean


# --- the command -------------------------------------------------------------------------------------


def test_cli_quantize_json_and_info(tmp_path, tiny_gguf, capsys):
    src, _ = tiny_gguf
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. " * 4)
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(src), "--to", "q8_0", "--out", str(out), "--text", str(text), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["type"] == "Q8_0" and out.is_file()
    q = result["quality"]
    assert q["top1_agreement"] > 0.5 and q["kl_mean"] >= 0 and q["scored"] > 50 and result["same_tokenization"]
    folder = tmp_path / "i4"
    assert main(["quantize", str(src), "--to", "int4", "--out", str(folder), "--no-eval"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", str(folder)]) == 0
    assert "int4" in [line for line in capsys.readouterr().out.splitlines() if line.startswith("quantization")][0]


def test_cli_errors(tmp_path, tiny_gguf, capsys):
    src, _ = tiny_gguf
    assert main(["quantize", str(src), "--to", "q3_k", "--out", str(tmp_path / "x.gguf")]) == 1
    assert "--to must be one of" in capsys.readouterr().err
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep me")
    assert main(["quantize", str(src), "--to", "q8_0", "--out", str(existing)]) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and err.count("\n") == 1
    assert existing.read_bytes() == b"keep me"
    assert main(["quantize", str(src), "--to", "q8_0", "--out", str(existing), "--force", "--no-eval"]) == 0
    assert existing.read_bytes()[:4] == b"GGUF"
    capsys.readouterr()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    assert main(["quantize", str(bad), "--to", "q8_0", "--out", str(tmp_path / "y.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("camelid: error:") and err.count("\n") == 1
    assert not (tmp_path / "y.gguf").exists()
    assert main(["quantize", str(src), "--to", "q8_0", "--out", str(src), "--force"]) == 1
    assert "source model itself" in capsys.readouterr().err
    assert main(["quantize", str(src), "--to", "int8", "--out", str(tmp_path / "no" / "such"), "--no-eval"]) == 1
    assert "no such folder" in capsys.readouterr().err


# --- the real default model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_to_q8_0_in_llama_cpp(tmp_path, default_model_path):
    out = tmp_path / "smol-q8_0.gguf"
    write(read(default_model_path), out, "q8_0")
    llm = _llama_cpp(out, n_ctx=256)
    ckpt = read(out)
    text = "The capital of France is"
    ids = ckpt.tokenizer.encode(text, bos=True)
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids
    ours = logits(ckpt, ids).numpy()
    theirs = _llama_cpp_logits(llm, ids)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.8
    # greedy continuation: llama.cpp and camelid (reference path) on the written file
    greedy = llm.create_completion(text, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert greedy.strip()
    seq = list(ids)
    model = build_model(ckpt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert ckpt.tokenizer.decode(seq[len(ids):]) == greedy


# --- from Meta folders (SentencePiece and tiktoken vocabularies) -------------------------------------


def test_sentencepiece_meta_folder_to_gguf(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from test_formats_hf import PROBE, TEXT
    from test_formats_meta import HIDDEN, PARAMS, llama_config, meta_state, random_model, split, train_sentencepiece, write_meta

    sp_model = train_sentencepiece(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    model = random_model(llama_config(sp.get_piece_size(), intermediate_size=HIDDEN), seed=5)
    folder = write_meta(tmp_path / "meta", split(meta_state(model), 1, vocab_parallel=False), {**PARAMS, "vocab_size": -1}, sp_model)
    out = tmp_path / "spm.gguf"
    write(read(folder), out, "f16")
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.model"].contents() == "llama"
    llm = _llama_cpp(out)
    for text in [PROBE, *TEXT]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [1, *sp.encode(text)], text
    ids = [1, *sp.encode(TEXT[0])]
    theirs, ref = _llama_cpp_logits(llm, ids), logits(folder, ids).numpy()
    assert np.abs(theirs - ref).max() < 0.02 * np.abs(ref).max()


def test_llama3_tiktoken_meta_folder_to_gguf(tmp_path):
    """tiktoken vocabulary + Llama 3.1 RoPE scaling: llama.cpp reads the pre-tokenizer name and rope_freqs."""
    from test_formats_hf import PROBE, TEXT
    from test_formats_meta import (
        HIDDEN,
        PARAMS,
        llama_config,
        meta_state,
        random_model,
        split,
        tiktoken_ranks,
        train_bpe,
        write_meta,
        write_tiktoken,
    )

    ranks = tiktoken_ranks(train_bpe())
    vocab = len(ranks) + 256
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = random_model(llama_config(vocab, intermediate_size=HIDDEN, rope_theta=500000.0, rope_scaling=scaling), seed=3)
    params = {**PARAMS, "vocab_size": vocab, "rope_theta": 500000.0, "use_scaled_rope": True}
    folder = write_meta(tmp_path / "meta", split(meta_state(model), 1, vocab_parallel=True), params,
                        write_tiktoken(ranks, tmp_path / "tokenizer.model"))
    src = read(folder)
    assert src.config.rope_scaling is not None
    out = tmp_path / "l3.gguf"
    write(src, out, "f16")
    r = gguf.GGUFReader(out)
    assert r.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert "rope_freqs.weight" in {t.name for t in r.tensors}
    llm = _llama_cpp(out)
    for text in [PROBE, *TEXT]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == src.tokenizer.encode(text, bos=True), text
    ids = src.tokenizer.encode(" ".join(TEXT[:3]), bos=True)[:60]
    theirs, ref = _llama_cpp_logits(llm, ids), logits(src, ids).numpy()
    # 0.16% measured; without rope_freqs llama.cpp is 1.3% off the source: the scaling must be what it applies
    assert np.abs(theirs - ref).max() < 0.005 * np.abs(ref).max()
    assert read(out).config.rope_scaling == src.config.rope_scaling


def test_sentencepiece_without_model_file_is_refused(tmp_path, hf_folder):
    from camelid.errors import UnsupportedModelError

    ckpt = read(hf_folder)
    ckpt.tokenizer.kind = "spm"  # as if its tokenizer.json held a converted SentencePiece vocabulary
    with pytest.raises(UnsupportedModelError, match="only tokenizer.json"):
        write(ckpt, tmp_path / "x.gguf", "q8_0")
    assert not (tmp_path / "x.gguf").exists()
