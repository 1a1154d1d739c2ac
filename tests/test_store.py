"""The model store: pull from a URL with checksum, list, rm, resolve, unknown names."""

from __future__ import annotations

import hashlib

import pytest

from camelid import store
from camelid.errors import ModelNotFoundError, StoreError


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "src" / "Tiny-Model.gguf"
    p.parent.mkdir()
    p.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    return p


def test_pull_list_rm_by_url(isolated_home, model_file):
    url = model_file.as_uri()
    path = store.pull(url)
    assert path.read_bytes() == model_file.read_bytes()
    manifest = (path.parent / "manifest.json").read_text()
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() in manifest
    rows = {r["name"]: r for r in store.list_models()}
    assert rows["tiny-model"]["pulled"] and rows["tiny-model"]["size"] == model_file.stat().st_size
    assert rows[store.DEFAULT_MODEL]["pulled"] is False  # known but not pulled in this home
    assert store.resolve("tiny-model") == path  # a pulled entry resolves by name
    assert store.pull(url) == path  # already there: nothing fetched
    store.remove("tiny-model")
    assert not path.exists()
    with pytest.raises(ModelNotFoundError):
        store.remove("tiny-model")


def test_rm_takes_the_converted_model_and_compiled_step_along(isolated_home, tmp_path, monkeypatch):
    """camelid rm deletes what loads derived from the model's files (camelid/converted.py, camelid/compiled.py),
    and nothing of another model."""
    from gguf import GGMLQuantizationType as Q
    from gguf_factory import Spec, byte_level_vocab, write_gguf

    from camelid import compiled, converted
    from camelid.formats import read
    from camelid.loader import build_model

    monkeypatch.setenv("CAMELID_CONVERTED", "1")
    paths, packages = [], []
    for name in ("one", "two"):
        src = tmp_path / f"{name}.gguf"
        write_gguf(src, Spec(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128), byte_level_vocab(), Q.Q4_0)
        paths.append(store.pull(src.as_uri()))
        build_model(read(paths[-1]), quant="auto", reuse=True)
        packages.append(compiled.package_path(paths[-1], "auto"))
        packages[-1].parent.mkdir(parents=True, exist_ok=True)
        packages[-1].write_bytes(b"stand-in package")
    assert all(list(converted.entry_dir(p).glob("*.pt")) for p in paths)
    store.remove("one")
    assert not converted.entry_dir(paths[0]).exists() and not packages[0].exists()
    assert list(converted.entry_dir(paths[1]).glob("*.pt")) and packages[1].exists()


def test_checksum_mismatch_is_refused_and_leaves_nothing(isolated_home, model_file, monkeypatch):
    bad = store.Source(kind="url", filename="x.gguf", url=model_file.as_uri(), sha256="0" * 64)
    monkeypatch.setitem(store.REGISTRY, "bad-model", bad)
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.pull("bad-model")
    assert store.installed_path("bad-model") is None
    assert not list((isolated_home / "models" / "bad-model").glob("*.gguf"))


def test_unknown_names_and_missing_paths(isolated_home):
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        store.resolve("no-such-model")
    with pytest.raises(ModelNotFoundError, match="no such file"):
        store.resolve("/nowhere/model.gguf")
    with pytest.raises(ModelNotFoundError, match="not pulled"):
        store.resolve(store.DEFAULT_MODEL, pull_missing=False)


def test_failed_download_is_one_clear_error(isolated_home, tmp_path):
    with pytest.raises(StoreError, match="download"):
        store.pull((tmp_path / "missing.gguf").as_uri())


def test_recommended_sampling():
    assert store.recommended_sampling(store.REGISTRY[store.DEFAULT_MODEL].filename)["temperature"] == 0.0
    assert store.recommended_sampling("other.gguf") == store.GENERAL_SAMPLING
