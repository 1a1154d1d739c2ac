"""camelid's kernels (camelid/kernels.py). The decode attention against torch's attention: the same values within
float32 rounding at every head size and grouping it is built for, across chunk boundaries and masked rows, over a
float32 or a float16 cache; and the same bits for a row alone or beside longer rows, and on one thread or two (what
identical greedy output in a batch rests on). The 4-bit dequantization against camelid/quant.py's torch code: the
same bits, for every layout and both output types."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from camelid import kernels
from camelid import quant as Q


@pytest.fixture(scope="module", autouse=True)
def library():
    kernels.load(build_missing=True)  # about 30 s the first time on a machine, then kept in the store


def _case(B: int, H: int, K: int, E: int, S: int, lengths: list[int], capacity: int | None = None):
    """q [B,1,H,E]; k, v the first S slots of a [B,K,capacity,E] cache; the mask hides each row's slots >= length."""
    capacity = capacity or S + 7
    kc, vc = torch.randn(B, K, capacity, E), torch.randn(B, K, capacity, E)
    q = torch.randn(B, 1, H, E)
    mask = torch.zeros(B, 1, 1, S)
    for b, n in enumerate(lengths):
        mask[b, ..., n:] = float("-inf")
    return q, kc[:, :, :S], vc[:, :, :S], mask


def _torch(q, k, v, mask):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize(("E", "H", "K"), [(64, 9, 3), (16, 4, 2), (128, 8, 8), (64, 32, 4), (96, 6, 2)])
@pytest.mark.parametrize("S", [1, 2, 255, 256, 257, 700])
def test_matches_torch_attention(E, H, K, S):
    q, k, v, mask = _case(2, H, K, E, S, [S, max(1, S // 3)])
    got = kernels.decode_attention(q, k, v, mask)
    assert got.shape == (2, 1, H, E)
    torch.testing.assert_close(got, _torch(q, k, v, mask), atol=2e-6, rtol=1e-5)


def test_large_scores_and_a_strided_query():
    """Scores far from 0 (the running maximum matters) and q a view with gaps between heads, as the model's
    fused QK projection gives it."""
    for seed in range(4):
        torch.manual_seed(seed)
        q, k, v, mask = _case(1, 9, 3, 64, 600, [600])
        qk = torch.randn(1, 1, 12, 64) * 30
        q = qk[:, :, :9]  # heads 9 apart in a row of 12
        got = kernels.decode_attention(q, k * 3, v, mask)
        # scores near 100 carry float32 rounding of about 1e-5 into the weights, torch's as well as the kernel's:
        # both against float64, the kernel's error at most a few times torch's
        exact = _torch(*(t.double() for t in (q, k * 3, v, mask)))
        ours, theirs = ((t.double() - exact).abs().max().item() for t in (got, _torch(q, k * 3, v, mask)))
        assert ours <= 4 * theirs + 1e-6, (seed, ours, theirs)


def test_a_row_gets_the_same_bits_alone_and_beside_longer_rows():
    q, k, v, mask = _case(3, 9, 3, 64, 900, [300, 900, 513], capacity=1000)
    batch = kernels.decode_attention(q, k, v, mask)
    for b, n in enumerate([300, 900, 513]):
        alone = kernels.decode_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], mask[b : b + 1, ..., :n])
        assert torch.equal(alone, batch[b : b + 1]), b


def test_a_prompt_chunks_queries_each_attend_as_alone_whatever_chunk_holds_them():
    """Several queries per row (a prefill chunk, causal over the cache): torch's values, and each query's bits the
    same as when it attends alone over its own prefix, or within another grouping of the same prompt. The
    token-granular prompt cache (camelid/prompt_cache.py) rests on this."""
    from camelid.cache import attention_mask

    B, H, K, E, S, T = 2, 9, 3, 64, 530, 16
    kc, vc = torch.randn(B, K, S + 9, E), torch.randn(B, K, S + 9, E)
    q = torch.randn(B, T, H, E)
    positions = torch.stack([torch.arange(S - T, S), torch.arange(250, 250 + T)])  # row 1 across a chunk boundary
    mask = attention_mask(positions, S, torch.float32)
    got = kernels.decode_attention(q, kc[:, :, :S], vc[:, :, :S], mask)
    assert got.shape == (B, T, H, E)
    torch.testing.assert_close(got, _torch(q, kc[:, :, :S], vc[:, :, :S], mask), atol=2e-6, rtol=1e-5)
    for b in range(B):
        for t, p in enumerate(positions[b].tolist()):
            alone = kernels.decode_attention(q[b : b + 1, t : t + 1], kc[b : b + 1, :, : p + 1], vc[b : b + 1, :, : p + 1],
                                             torch.zeros(1, 1, 1, p + 1))
            assert torch.equal(alone, got[b : b + 1, t : t + 1]), (b, t)
        for lo, hi in ((0, 5), (5, 6), (6, T)):  # another grouping: chunks of 5, 1 and 10 queries
            span = int(positions[b, hi - 1]) + 1
            part = kernels.decode_attention(q[b : b + 1, lo:hi], kc[b : b + 1, :, :span], vc[b : b + 1, :, :span],
                                            attention_mask(positions[b : b + 1, lo:hi], span, torch.float32))
            assert torch.equal(part, got[b : b + 1, lo:hi]), (b, lo)


def test_the_same_bits_on_one_thread_and_two():
    q, k, v, mask = _case(2, 9, 3, 64, 1500, [1500, 700])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.decode_attention(q, k, v, mask)
        torch.set_num_threads(2)
        two = kernels.decode_attention(q, k, v, mask)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize(("E", "H", "K"), [(64, 9, 3), (16, 4, 2), (128, 8, 8), (96, 6, 2)])
@pytest.mark.parametrize("S", [1, 17, 256, 700])
def test_a_float16_cache_reads_as_its_float32_values(E, H, K, S):
    """The fast path keeps keys and values in float16 (model.kv_dtype): the kernel reads them as the float32 values
    they stand for, so it matches torch's attention over the float16 cache converted to float32, to float32 rounding."""
    q, k, v, mask = _case(2, H, K, E, S, [S, max(1, S // 3)])
    k16, v16 = k.half(), v.half()
    got = kernels.decode_attention(q, k16, v16, mask)
    assert got.dtype == torch.float32 and got.shape == (2, 1, H, E)
    torch.testing.assert_close(got, _torch(q, k16.float(), v16.float(), mask), atol=2e-6, rtol=1e-5)


def test_a_float16_cache_keeps_the_bits_alone_batched_and_regrouped():
    """What identical greedy output and the token-granular prompt cache rest on, with the float16 cache: a row's
    bits the same alone or beside longer rows, and a prompt chunk's queries each as when attending alone."""
    from camelid.cache import attention_mask

    q, k, v, mask = _case(3, 9, 3, 64, 900, [300, 900, 513], capacity=1000)
    k, v = k.half(), v.half()
    batch = kernels.decode_attention(q, k, v, mask)
    for b, n in enumerate([300, 900, 513]):
        alone = kernels.decode_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], mask[b : b + 1, ..., :n])
        assert torch.equal(alone, batch[b : b + 1]), b
    T, S = 12, 400
    qs = torch.randn(1, T, 9, 64)
    positions = torch.arange(S - T, S)[None]
    chunk = kernels.decode_attention(qs, k[:1, :, :S], v[:1, :, :S], attention_mask(positions, S, torch.float32))
    for t, p in enumerate(positions[0].tolist()):
        alone = kernels.decode_attention(qs[:, t : t + 1], k[:1, :, : p + 1], v[:1, :, : p + 1], torch.zeros(1, 1, 1, p + 1))
        assert torch.equal(alone, chunk[:, t : t + 1]), t


def test_mixed_or_unsupported_cache_types_are_refused():
    q, k, v, mask = _case(1, 9, 3, 64, 10, [10])
    for kk, vv in ((k.half(), v), (k, v.half()), (k.bfloat16(), v.bfloat16())):
        with pytest.raises(RuntimeError):
            kernels.decode_attention(q, kk, vv, mask)


def test_what_it_covers():
    assert kernels.supports(64, 3, torch.float32) and kernels.supports(128, 8, torch.float32)
    assert not kernels.supports(64, 3, torch.bfloat16)
    assert not kernels.supports(80, 1, torch.float32) and not kernels.supports(64, 9, torch.float32)
    q, k, v, mask = _case(1, 5, 1, 80, 10, [10])
    with pytest.raises(RuntimeError, match="head size 80"):
        kernels.decode_attention(q, k, v, mask)


def test_a_missing_compiler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(kernels.KernelError, match=r"^no C\+\+ compiler \(.*no-such-c\+\+: No such file or directory\)$"):
        kernels.build(tmp_path / "k.so")
    assert not list(tmp_path.glob("*.so"))


def test_the_server_builds_it_when_missing_or_says_in_one_line_why_not(tmp_path, monkeypatch, capsys):
    """available(build_missing=True), as `camelid serve` calls it at start: without a compiler, one warning line and
    torch's attention for the whole process (decided once); CAMELID_KERNELS=0 never tries."""
    monkeypatch.setattr(kernels, "_available", None)
    monkeypatch.setattr(kernels, "_ready", False)
    monkeypatch.setattr(kernels, "library_path", lambda: tmp_path / "missing.so")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert kernels.available(build_missing=True) is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("camelid: building camelid's kernels")
    assert err[1].startswith("camelid: warning: no C++ compiler (") and err[1].endswith("reuses whole chunks")
    monkeypatch.setenv("CXX", "c++")
    assert kernels.available(build_missing=True) is False  # decided: a later call changes nothing
    monkeypatch.setattr(kernels, "_available", None)
    monkeypatch.setenv("CAMELID_KERNELS", "0")
    assert kernels.available(build_missing=True) is False and not (tmp_path / "missing.so").exists()


# --- camelid::dequantize_int4 ---

@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "int4/32", "int4/128", "int4/16"])  # /16: the scalar loop
@pytest.mark.parametrize("rows", [40, 64])  # 40 rows: padded to 48 for PyTorch's int4 kernel
def test_dequantize_int4_is_torchs_bit_for_bit(kind, rows, monkeypatch):
    rng = np.random.default_rng(rows)
    w = (rng.normal(size=(rows, 256)) * 10.0 ** rng.uniform(-4, 1, size=(rows, 1))).astype(np.float32)
    if kind.startswith("int4"):
        qw = Q.int4_from_float(torch.from_numpy(w), group=int(kind.split("/")[1]))
    else:
        qw = Q.from_gguf(kind, gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind]), w.shape)
    layer = Q.linear_for(qw)
    assert kernels.loaded() and not layer.doubled_input
    for dtype in (torch.float32, torch.bfloat16):
        got, part = layer.dequantize_rows(0, rows, dtype), layer.dequantize_rows(3, 29, dtype)
        with monkeypatch.context() as m:
            m.setattr(kernels, "loaded", lambda: False)  # quant.py's own torch code
            want = layer.dequantize_rows(0, rows, dtype)
        assert got.dtype == dtype and got.shape == (rows, 256)
        assert torch.equal(got, want) and torch.equal(part, want[3:29])
        assert torch.equal(layer.dequantize(dtype), want)


def test_dequantize_int4_refuses_what_it_cannot_read():
    layer = Q.linear_for(Q.int4_from_float(torch.randn(16, 64)))
    with pytest.raises(RuntimeError, match="nibbles must be a contiguous uint8"):
        kernels.dequantize_int4(layer.nibbles.int(), layer.scale_zero, 0, 16, layer.group, torch.float32)
    with pytest.raises(RuntimeError, match="rows out of range"):
        kernels.dequantize_int4(layer.nibbles, layer.scale_zero, 0, 17, layer.group, torch.float32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.dequantize_int4(layer.nibbles, layer.scale_zero, 0, 16, layer.group, torch.float16)
