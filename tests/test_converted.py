"""The converted-model cache (camelid/converted.py): a second load of a GGUF file maps the fast path's converted
model from the store instead of converting, and computes exactly what a fresh conversion does; a changed file, a
damaged entry or other settings convert again; the reference path keeps nothing."""

from __future__ import annotations

import os

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_factory import Spec, byte_level_vocab, write_gguf

from camelid import converted, loader
from camelid.formats import read
from camelid.loader import build_model

SPEC = Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMELID_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CAMELID_CONVERTED", "1")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, SPEC, byte_level_vocab(), Q.Q4_0)
    conversions = []
    real = loader._build
    monkeypatch.setattr(loader, "_build", lambda *a: conversions.append(a[3]) or real(*a))
    return path, conversions


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 17, 99, 4, 250, 31, 7, 200]])
    with torch.no_grad():
        return model(ids)


def _entries(path) -> list:
    return sorted(converted.entry_dir(path).glob("*.pt"))


def test_second_load_maps_the_kept_model_and_computes_the_same(store):
    path, conversions = store
    first = build_model(read(path), quant="auto", reuse=True)
    assert conversions == ["auto"] and len(_entries(path)) == 1
    second = build_model(read(path), quant="auto", reuse=True)
    assert conversions == ["auto"]  # not converted again
    fresh = build_model(read(path), quant="auto")  # no reuse: converts, keeps nothing new
    assert conversions == ["auto", "auto"] and len(_entries(path)) == 1
    assert type(second.layers[0].attention.wqkv) is type(fresh.layers[0].attention.wqkv)
    assert torch.equal(_logits(second), _logits(fresh)) and torch.equal(_logits(first), _logits(fresh))
    assert not second.training and not any(p.requires_grad for p in second.parameters())


def test_a_changed_file_or_other_settings_convert_again_and_replace_only_their_own_entry(store):
    path, conversions = store
    build_model(read(path), quant="auto", reuse=True)
    build_model(read(path), quant="int8", reuse=True)
    assert conversions == ["auto", "int8"] and len(_entries(path)) == 2
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed (as a re-download would)
    changed = build_model(read(path), quant="auto", reuse=True)
    assert conversions == ["auto", "int8", "auto"]
    names = [p.name for p in _entries(path)]
    assert len(names) == 2 and sum(n.startswith("auto-") for n in names) == 1  # the stale auto entry is gone
    assert torch.equal(_logits(changed), _logits(build_model(read(path), quant="auto")))


def test_a_damaged_entry_converts_again(store):
    path, conversions = store
    build_model(read(path), quant="auto", reuse=True)
    (entry,) = _entries(path)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 3])  # cut short, as by a crash or a full disk
    model = build_model(read(path), quant="auto", reuse=True)
    assert conversions == ["auto", "auto"]
    assert torch.equal(_logits(model), _logits(build_model(read(path), quant="auto")))
    assert build_model(read(path), quant="auto", reuse=True) is not None and conversions.count("auto") == 3


def test_nothing_is_kept_for_the_reference_path_or_when_turned_off(store, monkeypatch):
    path, conversions = store
    build_model(read(path), quant=None, reuse=True)
    assert not _entries(path)
    monkeypatch.setenv("CAMELID_CONVERTED", "0")
    build_model(read(path), quant="auto", reuse=True)
    build_model(read(path), quant="auto", reuse=True)
    assert conversions == [None, "auto", "auto"] and not _entries(path)


def test_camelid_load_uses_it(store):
    import camelid
    from camelid.sampling import SamplingParams

    path, conversions = store
    greedy = SamplingParams(temperature=0)
    a = camelid.load(path).generate("hello", max_tokens=8, sampling=greedy)
    b = camelid.load(path).generate("hello", max_tokens=8, sampling=greedy)
    assert conversions == ["auto"] and a == b


def test_a_llama4_model_with_lazily_built_experts_loads_and_keeps_nothing(store, tmp_path):
    """Llama 4's routed experts are built from the file's memory map as tokens reach them: nothing to keep (and
    they would not pickle); the load works as without the cache."""
    pytest.importorskip("transformers")
    import llama4_factory as F

    from camelid.formats.gguf_write import write_gguf as write_camelid_gguf

    write_camelid_gguf(read(F.save(F.causal_lm(), tmp_path / "hf")), tmp_path / "l4.gguf", "q8_0")
    model = build_model(read(tmp_path / "l4.gguf"), quant="auto", reuse=True)
    assert type(model.layers[0].feed_forward.experts).__name__ == "QuantExperts"
    assert not _entries(tmp_path / "l4.gguf")
    assert torch.equal(_logits_l4(model), _logits_l4(build_model(read(tmp_path / "l4.gguf"), quant="auto")))


def _logits_l4(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 30, 2]]))


def test_a_model_that_does_not_pickle_is_simply_not_kept(store, monkeypatch):
    path, conversions = store

    def refuse(*a, **k):
        raise TypeError("cannot pickle 'function' object")

    monkeypatch.setattr(torch, "save", refuse)
    model = build_model(read(path), quant="auto", reuse=True)
    assert model is not None and not _entries(path) and not list(converted.entry_dir(path).glob("*.tmp*"))
