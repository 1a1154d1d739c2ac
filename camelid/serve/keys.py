"""API keys with scopes and limits: the key file (`camelid keys add|list|revoke`) and the server's view of it.

The key file is the operator's JSON file. It holds, per key, a hash of the secret (never the secret: `keys add`
prints that once), the key's scopes (models, endpoints, guard categories) and limits (requests and tokens a
minute, requests at once, new tokens a request, tokens a UTC day), its expiry and, once revoked, when.

    {"version": 1, "keys": [{"name": "alice", "hash": "sha256:<hex>", "prefix": "sk-camelid-AbCd",
                             "created": "2026-12-02T04:20:00Z", "models": ["smollm2"], "rpm": 60, ...}]}

Every write is atomic (a temporary file in the same folder, fsynced, renamed over the old one) under a lock file,
so two `keys add` at once lose nothing and a reader never sees half a file. A running server re-reads the file
when its size, mtime or inode changes (looked at most once a second, on requests), so no restart is needed.
Nothing here imports the HTTP stack: the CLI uses it without loading the server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import CamelidError

SECRET_PREFIX = "sk-camelid-"
VERSION = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = ("default",)  # the --api-key key
# endpoint scope name -> the paths it opens
ENDPOINTS: dict[str, tuple[str, ...]] = {
    "chat": ("/v1/chat/completions",),
    "completions": ("/v1/completions",),
    "embeddings": ("/v1/embeddings",),
    "rerank": ("/v1/rerank", "/v2/rerank", "/rerank"),
    "moderations": ("/v1/moderations",),
    "tokenize": ("/tokenize", "/detokenize"),
    "models": ("/v1/models",),  # and /v1/models/{id}
    "metrics": ("/metrics",),
}
DEFAULT_ENDPOINTS = tuple(e for e in ENDPOINTS if e != "metrics")  # the server's metrics name every key: opt in
LIMITS = ("rpm", "tpm", "concurrency", "max_tokens", "daily_tokens")


class KeyFileError(CamelidError):
    """A key file that cannot be read or written, or a bad `keys` command value."""


def endpoint_of(path: str) -> str | None:
    """The endpoint scope a request path belongs to (None: a path no scope names, such as an unknown one)."""
    for name, paths in ENDPOINTS.items():
        if path in paths:
            return name
    return "models" if path.startswith("/v1/models/") else None


@dataclass(frozen=True)
class Key:
    """One API key: who (name), what it may reach (models, endpoints, categories) and how much (limits).

    None means: no restriction (models), the default set (endpoints: all but metrics), the policy's default
    (categories: the guard categories this key is checked against), no limit (the numbers)."""

    name: str
    hash: str = ""
    prefix: str = ""  # the secret's first characters, to tell keys apart in `keys list`
    created: float = 0.0
    models: tuple[str, ...] | None = None
    endpoints: tuple[str, ...] | None = None
    categories: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    max_tokens: int | None = None
    daily_tokens: int | None = None
    expires: float | None = None
    revoked: float | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # fields a newer camelid wrote, kept

    def allows_endpoint(self, endpoint: str) -> bool:
        return endpoint in (self.endpoints if self.endpoints is not None else DEFAULT_ENDPOINTS)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def status(self, now: float) -> str:
        """active, revoked or expired."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def to_json(self) -> dict:
        out = {"name": self.name, "hash": self.hash, "prefix": self.prefix, "created": iso(self.created)}
        for f in ("models", "endpoints", "categories"):
            if getattr(self, f) is not None:
                out[f] = list(getattr(self, f))
        out.update({f: getattr(self, f) for f in LIMITS if getattr(self, f) is not None})
        for f in ("expires", "revoked"):
            if getattr(self, f) is not None:
                out[f] = iso(getattr(self, f))
        return {**self.extra, **out}


# the --api-key key: unrestricted, every endpoint (the server's metrics too)
DEFAULT_KEY = Key(name="default", endpoints=tuple(ENDPOINTS))


def new_secret() -> str:
    """A new key secret: the prefix and 32 random bytes, URL-safe base64 (256 bits: a hash of it cannot be reversed)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What the key file stores for a secret."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str, what: str) -> float:
    """An ISO date-time (a naive one is UTC) as a Unix time."""
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise KeyFileError(f"{what}: {value!r} is not an ISO date or date-time (like 2027-01-31 or 2027-01-31T12:00:00Z)") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def parse_expires(value: str, now: float) -> float:
    """--expires: a date (the key works through that UTC day), an ISO date-time, or a duration from now (30d, 12h, 90m)."""
    m = re.fullmatch(r"(\d+)\s*([dhm])", value.strip())
    if m:
        t = now + int(m[1]) * {"d": 86400, "h": 3600, "m": 60}[m[2]]
    elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
        t = parse_time(value.strip(), "--expires") + 86400
    else:
        t = parse_time(value.strip(), "--expires")
    if t <= now:
        raise KeyFileError(f"--expires {value}: that is in the past ({iso(t)})")
    return t


def _list(value, where: str, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise KeyFileError(f"{where}: '{name}' must be a list of names")
    return tuple(value)


def key_from_json(d, where: str) -> Key:
    """One key of the file; KeyFileError naming the key and the field for anything wrong."""
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not NAME_RE.fullmatch(d["name"]):
        raise KeyFileError(f"{where}: each key needs a 'name' (letters, digits, '.', '_', '-')")
    where = f"{where}: key {d['name']!r}"
    h = d.get("hash")
    if not isinstance(h, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", h):
        raise KeyFileError(f"{where}: 'hash' must be 'sha256:' and 64 hex digits")
    values: dict = {}
    for f in LIMITS:
        v = d.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise KeyFileError(f"{where}: {f!r} must be a whole number >= 1, got {v!r}")
        values[f] = v
    endpoints = _list(d.get("endpoints"), where, "endpoints")
    bad = [e for e in endpoints or () if e not in ENDPOINTS]
    if bad:
        raise KeyFileError(f"{where}: unknown endpoint {bad[0]!r} (known: {', '.join(ENDPOINTS)})")
    times = {}
    for f in ("created", "expires", "revoked"):
        v = d.get(f)
        if v is not None and not isinstance(v, str):
            raise KeyFileError(f"{where}: {f!r} must be an ISO date-time string")
        times[f] = parse_time(v, f"{where}: {f!r}") if v is not None else None
    known = {"name", "hash", "prefix", "models", "endpoints", "categories", *LIMITS, "created", "expires", "revoked"}
    return Key(name=d["name"], hash=h, prefix=str(d.get("prefix", "")), created=times["created"] or 0.0,
               models=_list(d.get("models"), where, "models"), endpoints=endpoints,
               categories=_list(d.get("categories"), where, "categories"), expires=times["expires"],
               revoked=times["revoked"], extra={k: v for k, v in d.items() if k not in known}, **values)


def parse_keys(text: str, where: str) -> dict[str, Key]:
    """The key file's text -> {name: Key}; KeyFileError for anything wrong (bad JSON, a bad field, a name twice)."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KeyFileError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise KeyFileError(f'{where}: expected {{"version": 1, "keys": [...]}}')
    if data.get("version", VERSION) != VERSION:
        raise KeyFileError(f"{where}: key file version {data.get('version')!r}; this camelid reads version {VERSION}")
    keys: dict[str, Key] = {}
    for d in data.get("keys", []):
        k = key_from_json(d, where)
        if k.name in keys:
            raise KeyFileError(f"{where}: the key name {k.name!r} appears twice")
        if any(o.hash == k.hash for o in keys.values()):
            raise KeyFileError(f"{where}: keys {k.name!r} and {next(o.name for o in keys.values() if o.hash == k.hash)!r} "
                               "have the same secret")
        keys[k.name] = k
    return keys


def read_keys(path: str | os.PathLike) -> dict[str, Key]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file (make one with `camelid keys add NAME --file {path}`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e}") from None
    return parse_keys(text, str(path))


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Replace a file atomically (temporary file, fsync, rename, fsync of the folder), keeping its mode (0600 when new).
    OSError when it cannot."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # the rename itself survives a crash (POSIX)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_keys(path: str | os.PathLike, keys: dict[str, Key]) -> None:
    """Replace the key file atomically; mode 0600 when new."""
    text = json.dumps({"version": VERSION, "keys": [k.to_json() for k in keys.values()]}, indent=1) + "\n"
    try:
        atomic_write(path, text)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot write the key file: {e.strerror or e}") from None


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise read-modify-write of a key file between processes (a lock file beside it; POSIX flock)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the rename is still atomic, concurrent edits may race
        yield
        return
    if not path.parent.is_dir():
        raise KeyFileError(f"{path}: no such folder {path.parent}")
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _names(value: str | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(v.strip() for v in value.split(","))
    if not names or any(not n for n in names):
        raise KeyFileError(f"{what} {value!r}: expected a comma-separated list of names")
    return names


def add_key(path: str | os.PathLike, name: str, models: str | None = None, endpoints: str | None = None,
            categories: str | None = None, expires: str | None = None, now: float | None = None,
            **limits: int | None) -> tuple[Key, str]:
    """Add a key to the file (made if missing); (the key, its secret). The secret is not stored anywhere."""
    path = Path(path)
    now = time.time() if now is None else now
    if not NAME_RE.fullmatch(name):
        raise KeyFileError(f"key name {name!r}: use letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)")
    if name in RESERVED_NAMES:
        raise KeyFileError(f"key name {name!r} is reserved for serve --api-key; choose another")
    for f, v in limits.items():
        if f not in LIMITS:
            raise TypeError(f"unknown limit {f}")
        if v is not None and v < 1:
            raise KeyFileError(f"--{f.replace('_', '-')} must be >= 1, got {v}")
    eps = _names(endpoints, "--endpoints")
    if eps == ("all",):
        eps = tuple(ENDPOINTS)
    bad = [e for e in eps or () if e not in ENDPOINTS]
    if bad:
        raise KeyFileError(f"--endpoints: unknown endpoint {bad[0]!r} (known: {', '.join(ENDPOINTS)}, or all)")
    secret = new_secret()
    key = Key(name=name, hash=hash_secret(secret), prefix=secret[: len(SECRET_PREFIX) + 4], created=float(int(now)),
              models=_names(models, "--models"), endpoints=eps, categories=_names(categories, "--categories"),
              expires=parse_expires(expires, now) if expires is not None else None, **limits)
    with _locked(path):
        keys = read_keys(path) if path.exists() else {}
        if name in keys:
            was = " (revoked)" if keys[name].revoked is not None else ""
            raise KeyFileError(f"{path}: a key named {name!r} exists{was}; choose another name (names identify keys in "
                               "the audit log and metrics)")
        keys[name] = key
        write_keys(path, keys)
    return key, secret


def revoke_key(path: str | os.PathLike, name: str, now: float | None = None) -> Key:
    """Mark a key revoked (kept in the file, so `keys list` and the name's history stay); a running server refuses
    it with 401 from its next look at the file (within about a second)."""
    path = Path(path)
    with _locked(path):
        keys = read_keys(path)
        if name not in keys:
            have = ", ".join(keys) or "none"
            raise KeyFileError(f"{path}: no key named {name!r} (keys: {have})")
        if keys[name].revoked is not None:
            raise KeyFileError(f"{path}: the key {name!r} was revoked already, at {iso(keys[name].revoked)}")
        keys[name] = replace(keys[name], revoked=float(int(time.time() if now is None else now)))
        write_keys(path, keys)
    return keys[name]


def key_summary(k: Key, now: float) -> dict:
    """A key as `keys list --json` shows it (everything but the hash)."""
    d = {f: v for f, v in asdict(k).items() if f not in ("hash", "extra")}
    for f in ("created", "expires", "revoked"):
        d[f] = iso(d[f]) if d[f] is not None else None
    for f in ("models", "endpoints", "categories"):
        d[f] = list(d[f]) if d[f] is not None else None
    d["endpoints"] = d["endpoints"] or list(DEFAULT_ENDPOINTS)
    return {**d, "status": k.status(now)}


class KeyStore:
    """The server's view of a key file: secret -> Key, re-read when the file changes.

    `refresh()` looks at the file (stat) at most once every `interval` seconds of `clock`; a changed file that
    does not parse keeps the last good keys (a typo must neither open the server nor lock everyone out) and says
    so once on stderr."""

    def __init__(self, path: str | os.PathLike, clock: Callable[[], float] = time.time, interval: float = 1.0) -> None:
        self.path, self.clock, self.interval = Path(path), clock, interval
        self.keys: dict[str, Key] = {}
        self.by_hash: dict[str, Key] = {}
        self.reloads = 0
        self.problem: str | None = None
        self._seen = self._stat()
        self._load(read_keys(self.path))  # at start a bad file is an error (one line, no server)
        self._checked = clock()

    @property
    def ledger(self) -> Path:
        """Where the server keeps the day's token counts of each key (beside the key file)."""
        return self.path.with_name(self.path.name + ".usage")

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, keys: dict[str, Key]) -> None:
        self.keys, self.by_hash = keys, {k.hash: k for k in keys.values()}

    def refresh(self) -> None:
        now = self.clock()
        if now - self._checked < self.interval:
            return
        self._checked = now
        seen = self._stat()
        if seen == self._seen:
            return
        self._seen = seen
        try:
            self._load(read_keys(self.path))
            self.reloads += 1
            self.problem = None
            active = sum(k.status(now) == "active" for k in self.keys.values())
            print(f"camelid: re-read the key file {self.path}: {len(self.keys)} keys, {active} active", file=sys.stderr,
                  flush=True)
        except KeyFileError as e:
            self.problem = str(e)
            print(f"camelid: warning: the key file changed but cannot be used; keeping the last good keys: {e}",
                  file=sys.stderr, flush=True)

    def lookup(self, secret: str) -> Key | None:
        """The key whose secret this is (None: unknown). Only hashes are compared, so timing says nothing of a secret."""
        self.refresh()
        return self.by_hash.get(hash_secret(secret))
