"""The server's loads run in threads that end with them, so that the engine thread is the only one with an OpenMP
team (camelid/threads.py: with two, libgomp stops its workers spinning and decode got 4x slower on 2 cores)."""

from __future__ import annotations

import asyncio
import threading

import pytest

import camelid.serve as serve_mod
from camelid.threads import in_own_thread, in_own_thread_async


def test_a_load_runs_in_a_thread_that_ends_and_hands_back_its_result_or_error():
    seen = []

    def work(x, y=0):
        seen.append(threading.current_thread())
        return x + y

    assert in_own_thread(work, 2, y=3) == 5
    assert asyncio.run(in_own_thread_async(work, 4)) == 4
    assert all(t is not threading.main_thread() for t in seen)
    for t in seen:
        t.join(5)
        assert not t.is_alive()

    def fail():
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        in_own_thread(fail)


def test_serve_builds_its_model_off_the_main_thread(monkeypatch):
    where = []

    class Stop(Exception):
        pass

    def build_state(*args, **kwargs):
        where.append(threading.current_thread())
        raise Stop

    monkeypatch.setattr(serve_mod, "build_state", build_state)
    with pytest.raises(Stop):
        serve_mod.serve("some-model")
    assert where and where[0] is not threading.main_thread()


def test_camelid_load_converts_off_the_calling_thread(monkeypatch, tmp_path):
    """So an app may load in its main thread and generate in a worker thread at full speed."""
    from gguf import GGMLQuantizationType as Q
    from gguf_factory import Spec, byte_level_vocab, write_gguf

    import camelid
    import camelid.loader

    path = tmp_path / "tiny.gguf"
    write_gguf(path, Spec(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128), byte_level_vocab(), Q.Q8_0)
    where, build = [], camelid.loader.build_model

    def recording(*args, **kwargs):
        where.append(threading.current_thread())
        return build(*args, **kwargs)

    monkeypatch.setattr(camelid.loader, "build_model", recording)
    llm = camelid.load(path)
    assert where and where[0] is not threading.main_thread()
    assert llm.generate("hi", max_tokens=2) is not None  # and the model works from the caller's thread
