"""GGUF reader: weights of every tensor type, logits against independent implementations, Llama 3.1
rope_freqs, memory mapping, and bad files. Every file is a tiny random model written in the test by
llama.cpp's own gguf.GGUFWriter (tests/gguf_factory.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_factory import K_QUANTS, Spec, byte_level_vocab, llama3_rope_factors, permute, random_weights, write_gguf

from camelid.config import RopeScaling
from camelid.errors import FormatError, UnsupportedModelError
from camelid.formats import read
from camelid.loader import build_model

REPO = Path(__file__).resolve().parents[1]

# worst |error| of a type's round trip, as a fraction of the row's largest |weight| (about 1.5x half a
# quantization step, leaving room for the f16 rounding of the block scales)
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1 / 100, Q.Q5_1: 1 / 20, Q.Q5_0: 1 / 12,
             Q.Q4_1: 1 / 10, Q.Q4_0: 1 / 6}


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return build_model(read(path)).state_dict()


@pytest.mark.parametrize("qtype", list(TOLERANCE) + list(K_QUANTS), ids=lambda q: q.name)
def test_weights_equal_dequantized_data(tmp_path, qtype):
    """Every 2-D tensor stored as `qtype` loads as gguf-py's dequantization of it, Q/K back in HF order."""
    spec = Spec(dim=256, hidden_dim=256) if qtype in K_QUANTS else Spec()
    vocab = byte_level_vocab()
    floats = random_weights(spec, len(vocab.tokens))
    path = tmp_path / f"{qtype.name}.gguf"
    expected = write_gguf(path, spec, vocab, qtype, weights=floats)
    ckpt = read(path)
    assert {t.dtype for n, t in ckpt.tensors.items() if len(t.shape) == 2} == {qtype.name}
    state = build_model(ckpt).state_dict()
    assert set(state) == set(expected) | ({"output.weight"} if spec.tied else set())
    for name, want in expected.items():
        got = state[name].numpy()
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        if qtype in TOLERANCE:  # and the round trip stays within the type's precision
            f = floats[name]
            bound = TOLERANCE[qtype] * np.abs(f).max(axis=-1, keepdims=True)
            assert (np.abs(got - f) <= bound + 1e-7).all(), name
    # the file really stores Q/K in the interleaved order (otherwise this test could not fail)
    stored = gguf.GGUFReader(path).tensors
    raw_q = next(t for t in stored if t.name == "blk.0.attn_q.weight")
    deq = gguf.quants.dequantize(raw_q.data, raw_q.tensor_type)
    np.testing.assert_array_equal(deq, permute(expected["layers.0.attention.wq.weight"], spec.n_heads, None))
    assert not np.array_equal(deq, expected["layers.0.attention.wq.weight"])


def test_tied_output_shares_the_embedding(tmp_path):
    spec = Spec(tied=True)
    write_gguf(tmp_path / "tied.gguf", spec, byte_level_vocab())
    ckpt = read(tmp_path / "tied.gguf")
    assert ckpt.config.tie_embeddings and "output.weight" not in ckpt.tensors
    model = build_model(ckpt)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_metadata_to_config_and_chat_template(tmp_path):
    spec = Spec(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=96, norm_eps=1e-6, rope_theta=12345.0,
                context_length=321)
    vocab = byte_level_vocab()
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    write_gguf(tmp_path / "m.gguf", spec, vocab, chat_template=template)
    ckpt = read(tmp_path / "m.gguf")
    c = ckpt.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.max_seq_len) == (64, 3, 8, 2, 96, 321)
    assert c.vocab_size == len(vocab.tokens) and c.head_dim == 8 and not c.tie_embeddings
    assert c.norm_eps == pytest.approx(1e-6) and c.rope_theta == pytest.approx(12345.0) and c.rope_scaling is None
    assert ckpt.tokenizer.chat_template == template
    assert ckpt.tokenizer.eos_id == vocab.eos and ckpt.tokenizer.bos_id == vocab.bos


# --- logits against independent implementations ---


def reference_logits(w: dict[str, np.ndarray], spec: Spec, tokens: list[int], inv_freq: np.ndarray) -> np.ndarray:
    """A plain numpy (float64) llama: RMSNorm, rotate-half RoPE, causal GQA attention, SwiGLU."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    H, K, E = spec.n_heads, spec.n_kv_heads, spec.head_dim
    T = len(tokens)

    def rms(x, g):
        return g * x / np.sqrt((x * x).mean(-1, keepdims=True) + spec.norm_eps)

    ang = np.arange(T)[:, None] * inv_freq[None, :].astype(np.float64)  # [T,E/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):  # [T,heads,E]
        a, b = x[..., : E // 2], x[..., E // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    x = w["tok_embeddings.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        h = rms(x, w[p + "attention_norm.weight"])
        q = rope((h @ w[p + "attention.wq.weight"].T).reshape(T, H, E))
        k = rope((h @ w[p + "attention.wk.weight"].T).reshape(T, K, E))
        v = (h @ w[p + "attention.wv.weight"].T).reshape(T, K, E)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)  # query head j uses kv head j // (H/K)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(E) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", s, v).reshape(T, H * E) @ w[p + "attention.wo.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        g = h @ w[p + "feed_forward.w1.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    out = w.get("output.weight", w["tok_embeddings.weight"])
    return rms(x, w["norm.weight"]) @ out.T


def plain_inv_freq(spec: Spec) -> np.ndarray:
    return 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)


def camelid_logits(path: Path, tokens: list[int]) -> np.ndarray:
    model = build_model(read(path))
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].double().numpy()


TOKENS = [5, 77, 130, 200, 3, 99, 250, 17, 42, 42, 8, 150, 61, 255, 0, 128]


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_numpy_reference(tmp_path, tied):
    spec = Spec(tied=tied)
    weights = write_gguf(tmp_path / "f32.gguf", spec, byte_level_vocab())
    got = camelid_logits(tmp_path / "f32.gguf", TOKENS)
    want = reference_logits(weights, spec, TOKENS, plain_inv_freq(spec))
    assert got.shape == want.shape == (len(TOKENS), len(byte_level_vocab().tokens))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
}


def transformers_logits(weights: dict[str, np.ndarray], spec: Spec, tokens: list[int], rope_scaling: dict | None = None):
    transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is not installed")
    rope = None if rope_scaling is None else {"rope_type": "llama3", **rope_scaling}
    cfg = transformers.LlamaConfig(
        vocab_size=weights["tok_embeddings.weight"].shape[0], hidden_size=spec.dim, intermediate_size=spec.hidden_dim,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
        rms_norm_eps=spec.norm_eps, max_position_embeddings=16384, tie_word_embeddings=spec.tied,
        rope_theta=spec.rope_theta, rope_scaling=rope, attn_implementation="eager",  # (4.x and 5.x both take these)
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    state = {}
    for name, t in weights.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            sub, last = rest.rsplit(".", 1)
            name = f"model.layers.{i}.{HF_NAMES[sub]}.{last}"
        else:
            name = HF_NAMES[name]
        state[name] = torch.from_numpy(t)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path, tied):
    spec = Spec(tied=tied)
    weights = write_gguf(tmp_path / "f32.gguf", spec, byte_level_vocab())
    want = transformers_logits(weights, spec, TOKENS)
    np.testing.assert_allclose(camelid_logits(tmp_path / "f32.gguf", TOKENS), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama31_rope_freqs(tmp_path, factor):
    """rope_freqs made as llama.cpp's converter makes it -> the matching RopeScaling and the same logits as HF."""
    spec = Spec(rope_theta=500000.0)
    freqs = llama3_rope_factors(spec.head_dim, spec.rope_theta, factor=factor)
    assert freqs.max() == factor and freqs.min() == 1  # the tiny model has both scaled and unscaled frequencies
    weights = write_gguf(tmp_path / "l31.gguf", spec, byte_level_vocab(), rope_freqs=freqs)
    ckpt = read(tmp_path / "l31.gguf")
    assert ckpt.config.rope_scaling == RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=8192)
    assert "rope_freqs.weight" not in ckpt.tensors
    tokens = (TOKENS * 4)[:48]
    got = camelid_logits(tmp_path / "l31.gguf", tokens)
    # numpy reference with the converter's divisors applied to the plain frequencies
    want = reference_logits(weights, spec, tokens, plain_inv_freq(spec) / freqs.astype(np.float64))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    unscaled = reference_logits(weights, spec, tokens, plain_inv_freq(spec))
    assert np.abs(unscaled - want).max() > 1e-3  # the scaling matters at these positions
    scaling = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    np.testing.assert_allclose(got, transformers_logits(weights, spec, tokens, scaling), atol=1e-4, rtol=1e-4)


# --- memory ---


def file_mappings(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_f32_weights_are_views_of_the_memory_map(tmp_path):
    path = (tmp_path / "f32.gguf").resolve()
    write_gguf(path, Spec(), byte_level_vocab())
    model = build_model(read(path))
    ranges = file_mappings(path)
    assert ranges, "the file is not memory-mapped"
    outside = [n for n, t in model.state_dict().items()
               if not any(lo <= t.data_ptr() < hi for lo, hi in ranges) and not n.endswith(("wq.weight", "wk.weight"))]
    assert outside == []  # only Q/K (re-ordered rows) are copies


RSS_SCRIPT = """
import resource, sys
import torch
from camelid.formats import read
from camelid.loader import build_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = build_model(read(sys.argv[1]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(p.numel() for p in model.parameters())
print((after - before) * 1024, n * 4)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_quantized_load_does_not_hold_two_copies(tmp_path):
    """Peak RSS growth of loading a ~130 MB (as float32) Q8_0 model stays well under two float32 copies."""
    spec = Spec(dim=1024, n_layers=3, n_heads=8, n_kv_heads=8, hidden_dim=2816)
    path = tmp_path / "big.gguf"
    write_gguf(path, spec, byte_level_vocab(), Q.Q8_0, random_qtypes=(Q.Q8_0,))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    growth, f32_bytes = map(int, out.stdout.split())
    assert f32_bytes > 100e6
    # one float32 copy + the touched file pages (~0.27x) + one tensor of transients; two copies would be >= 2x
    assert growth < 1.6 * f32_bytes, f"peak RSS grew {growth / 1e6:.0f} MB for {f32_bytes / 1e6:.0f} MB of weights"


# --- bad files ---


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    write_gguf(path, Spec(), byte_level_vocab())
    return path


def load(path: Path):
    return build_model(read(path))


def assert_one_line(err: Exception, path: Path) -> None:
    msg = str(err)
    assert "\n" not in msg and str(path) in msg, msg


def truncation_points(path: Path) -> dict[str, int]:
    r = gguf.GGUFReader(path)
    return {
        "header": 10,
        "metadata": int(r.fields["tokenizer.ggml.tokens"].offset) + 40,
        "tensor_info": int(r.tensors[3].field.offset) + 5,
        "tensor_data": int(r.data_offset) + 1000,
        "last_tensor": path.stat().st_size - 8,
    }


@pytest.mark.parametrize("where", ["header", "metadata", "tensor_info", "tensor_data", "last_tensor"])
def test_truncated_file(tmp_path, good_file, where):
    cut = truncation_points(good_file)[where]
    bad = tmp_path / f"cut-{where}.gguf"
    bad.write_bytes(good_file.read_bytes()[:cut])
    with pytest.raises(FormatError) as e:
        load(bad)
    assert_one_line(e.value, bad)


@pytest.mark.parametrize("offset", [4, 8, 16, 24])
def test_random_bytes_in_header(tmp_path, good_file, offset):
    data = bytearray(good_file.read_bytes())
    data[offset:offset + 8] = b"\xfe\xed\xfa\xce\xde\xad\xbe\xef"
    bad = tmp_path / "garbled.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError) as e:
        load(bad)
    assert_one_line(e.value, bad)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architecture(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, Spec(), byte_level_vocab(), arch=arch)
    with pytest.raises(UnsupportedModelError) as e:
        load(path)
    assert_one_line(e.value, path)
    assert arch in str(e.value)


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    write_gguf(path, Spec(), byte_level_vocab(), drop=("layers.1.feed_forward.w2.weight",))
    with pytest.raises(FormatError) as e:
        load(path)
    assert_one_line(e.value, path)
    assert "layers.1.feed_forward.w2.weight" in str(e.value)


def test_tensor_of_wrong_shape(tmp_path):
    path = tmp_path / "shape.gguf"
    write_gguf(path, Spec(), byte_level_vocab(), reshape={"layers.0.attention.wv.weight": (64, 64)})
    with pytest.raises(FormatError) as e:
        load(path)
    assert_one_line(e.value, path)
    assert "wv" in str(e.value)


def test_unsupported_tokenizer_model(tmp_path):
    vocab = byte_level_vocab()
    vocab.model = "bert"
    path = tmp_path / "bert.gguf"
    write_gguf(path, Spec(), vocab)
    with pytest.raises(UnsupportedModelError) as e:
        load(path)
    assert_one_line(e.value, path)
    assert "bert" in str(e.value)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(FormatError) as e:
        load(bad)
    assert_one_line(e.value, bad)


def run_cli(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CAMELID_HOME": str(path.parent / "home")}
    return subprocess.run([sys.executable, "-m", "camelid", "run", str(path), "hi"], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("case", ["truncated", "qwen2"])
def test_cli_reports_bad_file_in_one_line(tmp_path, good_file, case):
    path = tmp_path / f"{case}.gguf"
    if case == "truncated":
        path.write_bytes(good_file.read_bytes()[: truncation_points(good_file)["tensor_data"]])
    else:
        write_gguf(path, Spec(), byte_level_vocab(), arch="qwen2")
    out = run_cli(path)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(path) in lines[0], out.stderr
