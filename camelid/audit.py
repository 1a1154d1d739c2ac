"""The tamper-evident audit log: its line format, the writer, and verify (no server imports).

A log is a file of JSON lines, one record per line, each carrying `seq` (its line number, from 1) and `prev` (the
SHA-256 of the previous line's bytes; 64 zeros on line 1), so editing, deleting, inserting or reordering a line
breaks the chain where it happened. Lines are of three types:

- `start`: a server opened the log (a new file, or a restart appending to an old one); names the signing key.
- `request`: one per HTTP request, written when the request ends (`camelid/serve/audit.py`).
- `checkpoint`: every N records, every CHECKPOINT_SECONDS while records wait, and on clean shutdown (`final`):
  an Ed25519 signature over (seq, time, key, final, prev), so the chain head at that line is pinned by a key the
  log's reader cannot forge. The newest checkpoint is also written (atomically) to `LOG.head`, which is how
  verify sees a log cut back to an earlier checkpoint.

Durability: each line is one `os.write` on an O_APPEND descriptor, so a process killed at any moment (SIGKILL
included) leaves every record it finished, complete; a torn last line can only come from a crash inside that one
write (or a full disk). The log is fsynced at every checkpoint (and at every record with `fsync="always"`): a
power loss can cost what was written since the last fsync, a killed process costs nothing.

The key file (`--audit-key`, default `LOG.key`, created on first use with mode 0600) holds the Ed25519 private key
and the HMAC key of the keyed hashes (`prompt_hmac`, `answer_hmac`: the text is not stored unless asked for, and a
reader without the key cannot test guesses against the hashes). The public key is written beside the log as
`LOG.pub` (PEM); verify needs only that.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import CamelidError

VERSION = 1
ZERO = "0" * 64  # line 1's `prev`
CHECKPOINT_EVERY = 100  # records between checkpoints (--audit-checkpoint)
CHECKPOINT_SECONDS = 60.0  # at most this long between a record and the checkpoint that signs it, while serving
FSYNC_POLICIES = ("checkpoint", "always")
_DOMAIN = b"camelid-audit-checkpoint-v1\n"  # signatures over these bytes can never be mistaken for another use


class AuditError(CamelidError):
    """A log, key or head file that cannot be used (one line: what and which file)."""


def line_hash(line: bytes) -> str:
    """The chain's link: SHA-256 (hex) of one line's bytes, without its newline."""
    return hashlib.sha256(line).hexdigest()


def now_iso() -> str:
    """UTC, millisecond precision: 2026-12-02T04:20:00.123Z (sorts as text)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def dumps(obj: dict) -> bytes:
    """One record as one line: compact JSON, ASCII only (so text with newlines or any code point stays one line)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def signed_bytes(checkpoint: dict) -> bytes:
    """What a checkpoint's signature covers: its seq, time, key, final flag and prev (the chain head)."""
    return _DOMAIN + _canonical({k: checkpoint.get(k) for k in ("seq", "time", "key", "final", "prev")})


# --- keys ---

def _ed25519():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def key_id(public) -> str:
    """A public key's short name: `ed25519:` + the first 32 hex digits of SHA-256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def public_pem(public) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class AuditKey:
    """The secrets of one log: the Ed25519 signing key and the HMAC key of the keyed hashes."""

    private: object  # ed25519.Ed25519PrivateKey
    hmac_key: bytes

    @property
    def public(self):
        return self.private.public_key()

    @property
    def id(self) -> str:
        return key_id(self.public)

    def keyed_hash(self, text: str) -> str:
        return keyed_hash(self.hmac_key, text)


def keyed_hash(hmac_key: bytes, text: str) -> str:
    """`hmac-sha256:` + HMAC-SHA256(key, UTF-8 text) in hex: the same text always gives the same value under one key."""
    return "hmac-sha256:" + hmac.new(hmac_key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def load_key(path: str | os.PathLike, create: bool = False) -> AuditKey:
    """Read a key file; with create, make a new one (mode 0600) when there is none. AuditError when it cannot be used."""
    ed = _ed25519()
    path = Path(path)
    if create and not path.exists():
        from cryptography.hazmat.primitives import serialization

        private = ed.Ed25519PrivateKey.generate()
        raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        body = {"camelid_audit_key": VERSION, "ed25519_private": base64.b64encode(raw).decode(),
                "hmac_key": base64.b64encode(os.urandom(32)).decode(), "created": now_iso()}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # made meanwhile by another process: read that one
        except OSError as e:
            raise AuditError(f"cannot create the audit key {path}: {e.strerror}") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(body, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
    try:
        mode = path.stat().st_mode & 0o777
        data = json.loads(path.read_text())
        private = ed.Ed25519PrivateKey.from_private_bytes(base64.b64decode(data["ed25519_private"], validate=True))
        hmac_key = base64.b64decode(data["hmac_key"], validate=True)
    except FileNotFoundError:
        raise AuditError(f"no audit key file {path}") from None
    except OSError as e:
        raise AuditError(f"cannot read the audit key {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{path} is not a camelid audit key file ({type(e).__name__}: {e})") from None
    if mode & 0o077:
        raise AuditError(f"the audit key {path} can be read by others (mode {mode:04o}): chmod 600 {path}")
    if len(hmac_key) < 16:
        raise AuditError(f"{path}: the HMAC key is shorter than 16 bytes")
    return AuditKey(private, hmac_key)


def load_public_key(path: str | os.PathLike):
    """The Ed25519 public key in a PEM file (as written to LOG.pub)."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise AuditError(f"no public key file {path} (give the log's public key with --public-key)") from None
    except OSError as e:
        raise AuditError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise AuditError(f"{path} is not a PEM public key") from None
    if not isinstance(public, _ed25519().Ed25519PublicKey):
        raise AuditError(f"{path} is not an Ed25519 public key")
    return public


def sibling(log: str | os.PathLike, suffix: str) -> Path:
    """LOG.key, LOG.pub, LOG.head: the files that sit beside a log."""
    log = Path(log)
    return log.with_name(log.name + suffix)


# --- the writer ---

def _read_tail(fd: int, size: int) -> tuple[bytes, bytes]:
    """(the last complete line without its newline, the bytes after the last newline: a torn line, usually b'')."""
    chunk, data = 1 << 16, b""
    pos = size
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
        end = data.rfind(b"\n")
        if end >= 0:
            cut = data.rfind(b"\n", 0, end)
            if cut >= 0 or pos == 0:
                return data[cut + 1:end], data[end + 1:]
    return b"", data  # no newline at all: the first line itself was torn


class AuditLog:
    """Appends records to a log, chained and checkpointed. Thread-safe; every method returns after its write.

    Opening checks the file (an audit log of this key, not cut back since its last signed checkpoint, not held by
    another process) and writes a `start` line; close() writes the final checkpoint."""

    def __init__(self, path: str | os.PathLike, key_path: str | os.PathLike | None = None, text: bool = False,
                 checkpoint_every: int = CHECKPOINT_EVERY, fsync: str = "checkpoint") -> None:
        if checkpoint_every < 1:
            raise AuditError(f"--audit-checkpoint must be >= 1, got {checkpoint_every}")
        if fsync not in FSYNC_POLICIES:
            raise AuditError(f"--audit-fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.path = Path(path)
        self.key_path = Path(key_path) if key_path is not None else sibling(self.path, ".key")
        self.head_path, self.pub_path = sibling(self.path, ".head"), sibling(self.path, ".pub")
        self.text, self.checkpoint_every, self.fsync = text, checkpoint_every, fsync
        self.lock = threading.Lock()
        self.failed: str | None = None  # why the log cannot be written any more (the server then refuses requests)
        self.closed = False
        self.records = 0  # request records written by this process
        if not self.path.parent.is_dir():
            raise AuditError(f"--audit-log {self.path}: no such folder {self.path.parent}")
        if self.path.exists() and self.path.stat().st_size and not self.key_path.exists():
            raise AuditError(f"the audit log {self.path} exists but its key {self.key_path} does not: give its "
                             "--audit-key, or start a new log")
        self.key = load_key(self.key_path, create=True)
        self._open()

    def _open(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise AuditError(f"cannot open the audit log {self.path}: {e.strerror}") from None
        try:
            self._lock_file()
            torn = self._resume()
            self._write_public_key()
            start = {"type": "start", "time": now_iso(), "version": VERSION, "key": self.key.id, "pid": os.getpid()}
            if torn is not None:
                start["torn"] = torn
            self._append(start)
            self.since_checkpoint, self.last_checkpoint = 1, time.monotonic()
        except OSError as e:  # a lock the filesystem does not support, a full disk, ...
            os.close(self.fd)
            raise AuditError(f"cannot write the audit log {self.path}: {e.strerror or e}") from None
        except BaseException:
            os.close(self.fd)
            raise
        self.closed = False

    def _lock_file(self) -> None:
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AuditError(f"the audit log {self.path} is being written by another process (one log per server)") from None

    def _resume(self) -> dict | None:
        """Continue an existing log's chain; returns the `torn` note when its last line was cut by a crash."""
        size = os.fstat(self.fd).st_size
        self.seq, self.prev, self.prefix = 0, ZERO, b""
        self._check_head(size)
        if size == 0:
            return None
        last, torn = _read_tail(self.fd, size)
        if len(torn) == size:  # the very first line was torn
            self.prefix = b"\n"
            self.seq, self.prev = 1, line_hash(torn)
            return {"line": 1, "sha256": self.prev, "bytes": len(torn)}
        try:
            rec = json.loads(last)
            seq = rec["seq"]
            if not isinstance(seq, int) or not isinstance(rec.get("prev"), str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"{self.path} is not a camelid audit log (its last complete line is not a record); "
                             "run `camelid audit verify` on it, or give another --audit-log") from None
        self.seq, self.prev = seq, line_hash(last)
        if not torn:
            return None
        self.prefix = b"\n"  # the start line ends the torn one where it stops: it stays in the file, and in the chain
        self.seq, self.prev = seq + 1, line_hash(torn)
        return {"line": seq + 1, "sha256": self.prev, "bytes": len(torn)}

    def _check_head(self, size: int) -> None:
        """The newest signed checkpoint (LOG.head) must still be in the log: else the log was cut while we were away."""
        if not self.head_path.exists():
            return
        try:
            head = json.loads(self.head_path.read_text())
            offset, line = head["offset"], head["line"].encode()
            key = json.loads(line)["key"]
            if not isinstance(offset, int) or offset < 0:
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise AuditError(f"{self.head_path} is not a camelid audit head file; move it aside to start a new log") from None
        if key != self.key.id:
            raise AuditError(f"the audit log {self.path} is signed with another key ({key}, not {self.key.id} in "
                             f"{self.key_path}): give its --audit-key, or start a new log")
        if os.pread(self.fd, len(line), offset) != line:
            raise AuditError(f"the audit log {self.path} no longer holds its last signed checkpoint (line "
                             f"{json.loads(line)['seq']}, named in {self.head_path}): it was cut or changed; "
                             f"run `camelid audit verify {self.path}` and move it (and its .head) aside")

    def _write_public_key(self) -> None:
        pem = public_pem(self.key.public)
        try:
            if self.pub_path.exists() and self.pub_path.read_bytes() == pem:
                return
            tmp = self.pub_path.with_name(self.pub_path.name + ".tmp")
            tmp.write_bytes(pem)
            os.replace(tmp, self.pub_path)
        except OSError as e:
            raise AuditError(f"cannot write the public key {self.pub_path}: {e.strerror}") from None

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a regular file takes the whole line at once; a short write (a full disk) continues it
            n = os.write(self.fd, view)
            view = view[n:]

    def _append(self, fields: dict) -> dict:
        """Write one line (seq and prev first); the caller holds the lock (or is __init__)."""
        obj = {"seq": self.seq + 1, "prev": self.prev, **fields}
        if obj["type"] == "checkpoint":
            obj["sig"] = base64.b64encode(self.key.private.sign(signed_bytes(obj))).decode()
        line = dumps(obj)
        self._write(self.prefix + line + b"\n")  # one write: a line is on disk whole, or is the torn last one
        self.prefix = b""
        self.seq, self.prev = obj["seq"], line_hash(line)
        return obj

    def record(self, fields: dict) -> int:
        """Append one request record (`type` is set to "request"); returns its line number. AuditError when the log
        cannot be written (and every later call fails too: the server stops serving rather than serve unlogged)."""
        with self.lock:
            if self.failed:
                raise AuditError(self.failed)
            late = self.closed  # a request that ended after close(): the log is reopened for it, and closed again
            if late:
                self._open()
            try:
                obj = self._append({"type": "request", **fields})
                self.records += 1
                self.since_checkpoint += 1
                if self.fsync == "always":
                    os.fsync(self.fd)
                if late:
                    self._close()
                elif self.since_checkpoint >= self.checkpoint_every:
                    self._checkpoint(final=False)
            except OSError as e:
                self.failed = f"cannot write the audit log {self.path}: {e.strerror or e}"
                raise AuditError(self.failed) from None
            return obj["seq"]

    def checkpoint(self, final: bool = False, if_pending: bool = False) -> None:
        """Sign the chain head now (if_pending: only when records were written since the last checkpoint)."""
        with self.lock:
            if self.failed or self.closed or (if_pending and not self.since_checkpoint):
                return
            try:
                self._checkpoint(final)
            except OSError as e:
                self.failed = f"cannot write the audit log {self.path}: {e.strerror or e}"
                raise AuditError(self.failed) from None

    def due(self) -> bool:
        """Records are waiting for a signature longer than CHECKPOINT_SECONDS."""
        return bool(self.since_checkpoint) and time.monotonic() - self.last_checkpoint >= CHECKPOINT_SECONDS

    def _checkpoint(self, final: bool) -> None:
        end = os.fstat(self.fd).st_size
        obj = self._append({"type": "checkpoint", "time": now_iso(), "key": self.key.id, "final": final})
        os.fsync(self.fd)  # the signed head reaches the disk before the head file names it
        head = json.dumps({"offset": end, "line": dumps(obj).decode()}) + "\n"
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, head.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.head_path)
        self.since_checkpoint, self.last_checkpoint = 0, time.monotonic()

    def close(self) -> None:
        """Write the final checkpoint (clean shutdown) and release the file. Idempotent."""
        with self.lock:
            if not self.closed:
                self._close()

    def _close(self) -> None:
        self.closed = True
        try:
            if not self.failed:
                self._checkpoint(final=True)
        except OSError as e:
            self.failed = f"cannot write the audit log {self.path}: {e.strerror or e}"
        finally:
            os.close(self.fd)  # and the lock with it

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- verify ---

@dataclass
class Report:
    """What verify found. status: "ok" (intact, every line signed), "tampered" (bad_line names the first line that is
    wrong or missing), or "unproven" (intact as far as it goes, but the end is not signed: see `end`)."""

    path: str
    key: str
    lines: int = 0
    records: int = 0
    checkpoints: int = 0
    signed_through: int = 0  # the last line a valid signature covers (0: none)
    closed: bool = False  # the last line is a clean shutdown's checkpoint
    torn_tail: bool = False
    bad_line: int | None = None
    problem: str | None = None
    end: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.bad_line is not None:
            return "tampered"
        return "ok" if self.signed_through == self.lines and not self.torn_tail and self.lines else "unproven"

    def to_dict(self) -> dict:
        return {"status": self.status, "path": self.path, "key": self.key, "lines": self.lines, "records": self.records,
                "checkpoints": self.checkpoints, "signed_through": self.signed_through, "closed": self.closed,
                "torn_tail": self.torn_tail, "bad_line": self.bad_line, "problem": self.problem, "end": self.end,
                "notes": self.notes}


def _read_head(path: Path, public, kid: str) -> tuple[dict | None, bytes | None, str | None]:
    """(checkpoint, its line bytes, problem) from LOG.head."""
    try:
        head = json.loads(path.read_text())
        line = head["line"].encode()
        cp = json.loads(line)
        sig = base64.b64decode(cp["sig"], validate=True)
        public.verify(sig, signed_bytes(cp))
    except FileNotFoundError:
        return None, None, None
    except Exception as e:  # noqa: BLE001 (any malformed or forged head file is the same finding)
        return None, None, f"{path} is not a valid signed head file ({type(e).__name__})"
    if cp.get("key") != kid:
        return None, None, f"{path} is signed by another key ({cp.get('key')})"
    return cp, line, None


def verify(path: str | os.PathLike, public_key: str | os.PathLike | None = None) -> Report:
    """Check a log's chain, its checkpoints' signatures and its head file; name the first bad line.

    What it proves: every line up to `signed_through` is exactly as written, in order, none removed or added (a
    signed checkpoint pins the hash chain over all of them). Lines after the last checkpoint hang together, but
    whoever can write the file could have changed or cut them (they are not signed yet); a cut back to an earlier
    checkpoint is caught through LOG.head, unless LOG.head was also replaced by an older copy of itself."""
    from cryptography.exceptions import InvalidSignature

    path = Path(path)
    public = load_public_key(public_key if public_key is not None else sibling(path, ".pub"))
    kid = key_id(public)
    rep = Report(str(path), kid)
    head_cp, head_line, problem = _read_head(sibling(path, ".head"), public, kid)
    if problem:
        rep.notes.append(problem)
    elif head_cp is None:
        rep.notes.append(f"no head file {sibling(path, '.head').name}: a cut back to a checkpoint cannot be told apart "
                         "from a log that ends there")

    def bad(line: int, why: str) -> Report:
        rep.bad_line, rep.problem = line, why
        return rep

    prev, torn_at, last = ZERO, None, None
    try:
        f = open(path, "rb")
    except OSError as e:
        raise AuditError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for i, (raw, following) in enumerate(_with_next(f), 1):
            rep.lines = i
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if not raw.endswith(b"\n"):
                rep.torn_tail = True
                rep.end = (f"line {i} is incomplete (a crash while it was written, or a cut): the log stops after line "
                           f"{i - 1}")
                break
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError
            except ValueError:
                if torn_at is not None:
                    return bad(torn_at, f"line {torn_at} is not a record")
                torn_at, prev = i, line_hash(line)  # a torn line is fine if the next start line owns up to it
                continue
            if torn_at is not None:
                note = rec.get("torn") if rec.get("type") == "start" else None
                if not isinstance(note, dict) or note.get("line") != torn_at or note.get("sha256") != prev:
                    return bad(torn_at, f"line {torn_at} is not a record")
                rep.notes.append(f"line {torn_at} is a record torn by a crash, acknowledged by the restart on line {i}")
                torn_at = None
            if rec.get("seq") != i:
                return bad(i, f"line {i} says it is line {rec.get('seq')}: lines before it were deleted, inserted or "
                              "moved (or it was edited)")
            if rec.get("prev") != prev:
                if i == 1:
                    return bad(1, "line 1 does not start a log (its 'prev' is not zero)")
                after = _prev_of(following)
                if last is not None and last.get("type") == "checkpoint" and rep.signed_through == i - 1:
                    return bad(i, f"line {i} does not follow the signed line {i - 1}: it was changed or put there")
                if after is not None and after == prev:
                    return bad(i, f"line {i} was put between lines {i - 1} and {i + 1}, which link to each other")
                if after is not None and after != line_hash(line):
                    return bad(i, f"line {i} was changed: it links to neither line {i - 1} nor line {i + 1}")
                return bad(i - 1, f"line {i - 1} was changed: it no longer hashes to the 'prev' that line {i} holds")
            kind = rec.get("type")
            if kind == "request":
                rep.records += 1
            elif kind == "start":
                if rec.get("key") != kid:
                    return bad(i, f"line {i} starts a log signed by another key ({rec.get('key')}, not {kid})")
            elif kind == "checkpoint":
                try:
                    sig = base64.b64decode(rec["sig"], validate=True)
                    if rec.get("key") != kid:
                        raise InvalidSignature
                    public.verify(sig, signed_bytes(rec))
                except (KeyError, TypeError, ValueError, InvalidSignature):
                    return bad(i, f"the signature of checkpoint line {i} does not verify: it, or a line before it, was "
                                  "rewritten")
                rep.checkpoints += 1
                rep.signed_through = i
                rep.closed = bool(rec.get("final"))
            else:
                return bad(i, f"line {i} has an unknown type {kind!r}")
            if head_cp is not None and i == head_cp["seq"] and line != head_line:
                return bad(i, f"line {i} is not the signed checkpoint the head file holds for it")
            prev, last = line_hash(line), rec
            if kind != "checkpoint":
                rep.closed = False
    if torn_at is not None:  # a torn line with nothing after it: where the log stops
        rep.torn_tail = True
        rep.end = f"line {torn_at} is incomplete (a crash while it was written, or a cut): the log stops after line {torn_at - 1}"
    if head_cp is not None and head_cp["seq"] > rep.lines - rep.torn_tail:
        return bad(rep.lines - rep.torn_tail + 1, f"the log was cut: it ends at line {rep.lines - rep.torn_tail} but "
                   f"its head file holds the signed checkpoint of line {head_cp['seq']}")
    if rep.lines == 0:
        rep.end = "the log is empty"
    elif not rep.end:
        unsigned = rep.lines - rep.signed_through
        if rep.closed:
            rep.end = f"closed cleanly: the last line ({rep.lines}) is the final checkpoint"
        elif not unsigned:
            rep.end = (f"every line is signed, up to the checkpoint on line {rep.lines}, but the log was not closed "
                       "cleanly (the server is running, or was killed)")
        else:
            rep.end = (f"lines {rep.signed_through + 1}-{rep.lines} follow the last checkpoint and are not signed yet "
                       "(the server is running, or was killed): intact as far as they go, but could have been changed "
                       "or cut by whoever can write the file")
    return rep


def _with_next(f):
    """Each raw line of a binary file with the raw line after it (b"" after the last)."""
    line = f.readline()
    while line:
        following = f.readline()
        yield line, following
        line = following


def _prev_of(raw: bytes) -> str | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec.get("prev") if isinstance(rec, dict) and isinstance(rec.get("prev"), str) else None


# --- reading ---

def parse_since(value: str) -> str:
    """A --since/--until value as an ISO UTC timestamp: an ISO date or time (UTC unless it names a zone), or an
    age such as 30s, 15m, 2h, 7d."""
    v = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(v) > 1 and v[-1] in units and v[:-1].replace(".", "", 1).isdigit():
        t = time.time() - float(v[:-1]) * units[v[-1]]
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    try:
        dt = datetime.fromisoformat(v[:-1] + "+00:00" if v.endswith(("Z", "z")) else v)
    except ValueError:
        raise AuditError(f"{value!r} is not a time: give an ISO date or time (2026-12-01, 2026-12-01T10:00, UTC unless "
                         "it has a zone) or an age (30s, 15m, 2h, 7d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def read_records(path: str | os.PathLike):
    """An iterator of (line number, record or None when the line is not one) over a log's lines; the file is opened
    at once (AuditError if it cannot be)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise AuditError(f"cannot read {path}: {e.strerror}") from None

    def lines():
        with f:
            for i, raw in enumerate(f, 1):
                try:
                    rec = json.loads(raw)
                except ValueError:
                    rec = None
                yield i, rec if isinstance(rec, dict) else None

    return lines()
