"""The compiled decode step (AOTInductor) against the eager model it was built from: the same logits, the same
greedy tokens through generate and through the server's engine alone and beside others, cache capacity free."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_factory import Spec, byte_level_vocab, write_gguf
from test_serve_engine import Collector

from camelid import compiled
from camelid.cache import KVCache
from camelid.formats import read
from camelid.generate import Request, generate
from camelid.loader import build_model
from camelid.serve.engine import Engine, make_sequence


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny Q4_0 model, its package built once (a minute or two of compiling), bound to a second load."""
    folder = tmp_path_factory.mktemp("compiled")
    path = folder / "tiny.gguf"
    write_gguf(path, Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128), byte_level_vocab(), Q.Q4_0)
    model = build_model(read(path), quant="auto")
    package = compiled.build(model, folder / "tiny.pt2")
    eager = build_model(read(path), quant="auto")
    fast = build_model(read(path), quant="auto")
    return eager, fast, compiled.CompiledStep(fast, package), read(path).tokenizer, package


@pytest.mark.slow
def test_step_matches_eager_at_any_batch_and_capacity(built):
    eager, fast, step, _, _ = built
    for batch, capacity in ((1, 40), (3, 97)):
        ce, cc = KVCache.for_model(eager, batch, capacity), KVCache.for_model(fast, batch, capacity)
        prompt = torch.randint(3, 200, (batch, 9))
        with torch.inference_mode():
            eager(prompt, None, ce)
            fast(prompt, None, cc)
            positions = torch.arange(batch)[:, None] + 9 - torch.arange(batch)[:, None]  # filled rows end at 9
            tokens = torch.randint(3, 200, (batch, 1))
            want = eager(tokens, positions, ce)[:, -1]
            got = step(tokens, positions, cc)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(cc.k[1][:, :, :10], ce.k[1][:, :, :10])  # written in place, where eager writes


def test_the_package_holds_no_weights_and_reads_the_models_own(built):
    """The package keeps the code and Inductor's few scalars, not copies of the weights: the step reads the model's
    tensors themselves, so a change to one in place shows in the next step's logits as in eager's."""
    import zipfile

    eager, fast, step, _, package = built
    own = compiled.model_tensors(fast)
    with zipfile.ZipFile(package) as archive:
        folder, config = compiled._weights_config(archive)
        stored = {n for n in archive.namelist() if n.startswith(folder)}
    assert own and not any(folder + config[fqn][0] in stored for fqn in own if fqn in config)
    assert package.stat().st_size < sum(t.numel() * t.element_size() for t in own.values()) + (8 << 20)
    tokens, positions = torch.tensor([[7]]), torch.tensor([[3]])  # the exported span is at least 2
    with torch.inference_mode():
        before = step(tokens, positions, KVCache.for_model(fast, 1, 8))
        for m in (eager, fast):  # a tensor of the model's own (the norms are views of the read-only file)
            m.layers[0].attention.wo.scale_zero.mul_(2.0)
        want = eager(tokens, positions, KVCache.for_model(eager, 1, 8))[:, -1]
        after = step(tokens, positions, KVCache.for_model(fast, 1, 8))
        for m in (eager, fast):
            m.layers[0].attention.wo.scale_zero.div_(2.0)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, want, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_greedy_tokens_the_same_through_generate_and_engine(built):
    eager, fast, step, tokenizer, _ = built
    prompts = [[5, 17, 40, 2, 9], [7, 8, 100, 33, 1, 4, 4, 60, 12, 3, 9]]
    requests = [Request(p, 12) for p in prompts]
    want = list(generate(eager, requests))
    compiled._STEPS[fast] = step
    try:
        assert list(generate(fast, requests)) == want
        alone = list(generate(fast, requests[1:]))
        assert [s[0] for s in alone] == [s[1] for s in want if s[1] is not None]
        engine = Engine(fast, tokenizer, max_concurrency=4, max_seq_len=128)
        engine.start()
        try:
            outs = [Collector() for _ in prompts]
            for p, c in zip(prompts, outs, strict=True):
                engine.submit(make_sequence(p, 12, c))
            for c in outs:
                assert c.done.wait(300)
        finally:
            engine.stop()
        for b, c in enumerate(outs):
            assert c.ids == [s[b] for s in want if s[b] is not None]
    finally:
        compiled._STEPS.pop(fast, None)


def test_the_step_attends_with_camelids_kernel_and_a_row_decodes_the_same_alone_and_in_a_batch(built):
    """The package calls camelid's decode attention (camelid/kernels.py) rather than torch's; past one chunk of
    slots (256) a row's logits are the same bits alone as beside a longer row, and close to eager's."""
    import zipfile

    eager, fast, step, _, package = built
    with zipfile.ZipFile(package) as archive:
        assert any(b"camelid::decode_attention" in archive.read(n) for n in archive.namelist() if n.endswith(".json"))
    lengths = [300, 530]
    caches = [KVCache.for_model(m, 2, 600) for m in (eager, fast)]
    with torch.inference_mode():
        prompt = torch.randint(3, 200, (2, 530))
        for m, c in zip((eager, fast), caches, strict=True):
            m(prompt, None, c)  # the shorter row's slots past 300 are overwritten by nothing it reads
        tokens, positions = torch.randint(3, 200, (2, 1)), torch.tensor(lengths)[:, None]
        both = step(tokens, positions, caches[1])
        alone = KVCache([t[:1].clone() for t in caches[1].k], [t[:1].clone() for t in caches[1].v])
        first = step(tokens[:1], positions[:1], alone)
        want = eager(tokens, positions, caches[0])[:, -1]
    assert torch.equal(first, both[:1])
    torch.testing.assert_close(both, want, atol=1e-3, rtol=1e-3)


def test_a_package_without_its_kernel_is_refused_in_one_line(built, monkeypatch):
    from camelid import kernels

    _, fast, _, _, package = built
    monkeypatch.setattr(kernels, "_ready", False)
    monkeypatch.setattr(kernels, "library_path", lambda: package.parent / "missing.so")
    with pytest.raises(FileNotFoundError, match="attention kernel is not built here"):
        compiled.CompiledStep(fast, package)


def test_without_a_compiler_for_the_kernel_the_step_keeps_torchs_attention(built, monkeypatch, capsys):
    from camelid import kernels

    def refuse(build_missing=False):
        raise kernels.KernelError("no C++ compiler (c++: No such file or directory)")

    monkeypatch.setattr(kernels, "load", refuse)
    assert compiled.decode_kernel(built[1], build_missing=True) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["camelid: warning: no C++ compiler (c++: No such file or directory); the decode step uses torch's attention"]


def test_package_key_follows_model_file_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMELID_HOME", str(tmp_path))
    monkeypatch.delenv("CAMELID_COMPILED")  # conftest turns packages off for the other tests
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF0")
    a, b = compiled.package_path(f, "auto"), compiled.package_path(f, "int8")
    assert a != b and a.parent == tmp_path / "compiled"
    f.write_bytes(b"GGUF01")
    assert compiled.package_path(f, "auto") != a
    assert compiled.attach(SimpleNamespace(dtype=torch.float32), f, "auto") is False  # nothing built: eager decodes
