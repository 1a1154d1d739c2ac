"""The audit log's format, writer and verify: the chain and signatures checked with hashlib and `cryptography`
directly (the documented format, not camelid's verify), and each kind of tampering (edit, delete, insert, reorder,
truncate, forged signature, wrong key) named at its first bad line."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat

import pytest
from conftest import camelid_cli, one_line_error
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from camelid import cli
from camelid.audit import ZERO, AuditError, AuditLog, keyed_hash, load_key, parse_since, verify


def write_log(path, n=7, every=3, close=True, **kw) -> AuditLog:
    log = AuditLog(path, checkpoint_every=every, **kw)
    for i in range(n):
        log.record({"time": f"2026-12-0{1 + i % 2}T10:00:0{i}.000Z", "key": "alice" if i % 2 else "bob",
                    "endpoint": "/v1/completions", "i": i})
    if close:
        log.close()
    return log


def lines(path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def put(path, rows: list[bytes]) -> None:
    path.write_bytes(b"".join(r + b"\n" for r in rows))


@pytest.fixture()
def log_path(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path)
    return path


def test_format_is_a_sha256_chain_with_ed25519_checkpoints(log_path):
    """Checked from the documented format alone: seq = line number, prev = SHA-256 of the previous line, checkpoints
    signed over the canonical JSON of (seq, time, key, final, prev) behind the domain string."""
    rows = lines(log_path)
    public = serialization.load_pem_public_key(log_path.with_name("audit.log.pub").read_bytes())
    prev = ZERO
    kinds = []
    for i, row in enumerate(rows, 1):
        rec = json.loads(row)
        assert rec["seq"] == i and rec["prev"] == prev
        kinds.append(rec["type"])
        if rec["type"] == "checkpoint":
            signed = {k: rec[k] for k in ("seq", "time", "key", "final", "prev")}
            message = b"camelid-audit-checkpoint-v1\n" + json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()
            public.verify(base64.b64decode(rec["sig"]), message)  # raises if wrong
        prev = hashlib.sha256(row).hexdigest()
    # start, 2 records, checkpoint (3 since the start line), 3 records, checkpoint, 2 records, final checkpoint
    assert kinds == ["start", "request", "request", "checkpoint", *["request"] * 3, "checkpoint", "request", "request",
                     "checkpoint"]
    assert json.loads(rows[-1])["final"] is True and json.loads(rows[3])["final"] is False
    head = json.loads(log_path.with_name("audit.log.head").read_text())
    assert head["line"].encode() == rows[-1] and log_path.read_bytes()[head["offset"]:].rstrip(b"\n") == rows[-1]
    rep = verify(log_path)
    assert (rep.status, rep.lines, rep.records, rep.checkpoints, rep.closed) == ("ok", 11, 7, 3, True)


def test_key_file_is_private_and_matches_the_public_key(tmp_path, log_path):
    key_file = log_path.with_name("audit.log.key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(log_path.stat().st_mode) == 0o600
    data = json.loads(key_file.read_text())
    private = Ed25519PrivateKey.from_private_bytes(base64.b64decode(data["ed25519_private"]))
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pem == log_path.with_name("audit.log.pub").read_bytes()
    import hmac

    want = hmac.new(base64.b64decode(data["hmac_key"]), "héllo".encode(), hashlib.sha256).hexdigest()
    assert load_key(key_file).keyed_hash("héllo") == keyed_hash(base64.b64decode(data["hmac_key"]), "héllo") == \
        "hmac-sha256:" + want
    os.chmod(key_file, 0o644)
    with pytest.raises(AuditError, match="can be read by others"):
        AuditLog(log_path)
    (tmp_path / "junk.key").write_text("{}")
    os.chmod(tmp_path / "junk.key", 0o600)
    with pytest.raises(AuditError, match="not a camelid audit key"):
        AuditLog(tmp_path / "other.log", key_path=tmp_path / "junk.key")


def test_restart_continues_the_chain_and_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "a.log"
    write_log(path, n=2)
    log = AuditLog(path)
    with pytest.raises(AuditError, match="another process"):
        AuditLog(path)
    log.record({"i": "after restart"})
    log.close()
    log.record({"i": "late"})  # a request that ends after close: written and signed at once
    rep = verify(path)
    assert (rep.status, rep.records, rep.closed) == ("ok", 4, True)
    assert [json.loads(r)["type"] for r in lines(path)].count("start") == 3
    load_key(tmp_path / "new.key", create=True)
    with pytest.raises(AuditError, match="another key"):
        AuditLog(path, key_path=tmp_path / "new.key")  # (the head file names the log's key)
    path.with_name("a.log.key").rename(tmp_path / "moved.key")
    with pytest.raises(AuditError, match="exists but its key"):
        AuditLog(path)
    assert not path.with_name("a.log.key").exists()


def test_a_record_torn_by_a_crash_is_where_the_log_stops_then_acknowledged_at_restart(tmp_path):
    path = tmp_path / "a.log"
    log = write_log(path, n=4, close=False)
    os.close(log.fd)  # killed
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"seq":99,"prev":"0123')  # what a crash inside the last write leaves
    rep = verify(path)
    n = len(lines(path))
    assert rep.status == "unproven" and rep.torn_tail and rep.bad_line is None
    assert f"the log stops after line {n}" in rep.end


def test_torn_line_then_restart(tmp_path):
    path = tmp_path / "a.log"
    log = write_log(path, n=4, close=False)
    os.close(log.fd)  # the process died: its lock goes with it
    path.write_bytes(path.read_bytes() + b'{"seq":9,"prev":"01')
    n = len(lines(path))
    log = AuditLog(path)
    log.record({"i": "after the crash"})
    log.close()
    rep = verify(path)
    assert rep.status == "ok" and rep.bad_line is None
    assert any(f"line {n + 1} is a record torn by a crash" in note for note in rep.notes)
    start = json.loads(lines(path)[n + 1])
    assert start["type"] == "start" and start["torn"]["line"] == n + 1


# --- tampering: each named at its first bad line ---

def _edit(rows, k):
    rec = json.loads(rows[k - 1])
    rec["i"] = 1000
    rows[k - 1] = json.dumps(rec, separators=(",", ":")).encode()


@pytest.mark.parametrize("k", [2, 5, 9])  # before the first checkpoint, between two, and just before the final one
def test_an_edited_record_is_named(log_path, k):
    rows = lines(log_path)
    assert json.loads(rows[k - 1])["type"] == "request"
    _edit(rows, k)
    put(log_path, rows)
    rep = verify(log_path)
    assert rep.status == "tampered" and rep.bad_line == k, rep.problem


def test_an_edited_checkpoint_and_a_forged_signature_are_named(log_path):
    rows = lines(log_path)
    rec = json.loads(rows[7])  # line 8, a checkpoint
    rec["time"] = "2020-01-01T00:00:00.000Z"
    put(log_path, [*rows[:7], json.dumps(rec, separators=(",", ":")).encode(), *rows[8:]])
    assert verify(log_path).bad_line == 8
    # the attacker re-signs with a key of their own: the signature does not verify with the log's public key
    other = Ed25519PrivateKey.generate()
    from camelid.audit import signed_bytes

    rec = json.loads(rows[7])
    rec["sig"] = base64.b64encode(other.sign(signed_bytes(rec))).decode()
    put(log_path, [*rows[:7], json.dumps(rec, separators=(",", ":")).encode(), *rows[8:]])
    rep = verify(log_path)
    assert rep.bad_line == 8 and "signature" in rep.problem


def test_a_rewritten_chain_is_caught_at_the_next_checkpoint(log_path):
    """An attacker without the key edits line 5 and recomputes every later `prev`: the chain holds, the signature of
    the next checkpoint (line 8) does not."""
    rows = lines(log_path)
    _edit(rows, 5)
    for j in range(5, len(rows)):
        rec = json.loads(rows[j])
        rec["prev"] = hashlib.sha256(rows[j - 1]).hexdigest()
        rows[j] = json.dumps(rec, separators=(",", ":")).encode()
    put(log_path, rows)
    rep = verify(log_path)
    assert rep.bad_line == 8 and "signature" in rep.problem


@pytest.mark.parametrize("k", [2, 6, 10])
def test_a_deleted_line_is_named(log_path, k):
    rows = lines(log_path)
    put(log_path, rows[:k - 1] + rows[k:])
    rep = verify(log_path)
    assert rep.status == "tampered" and rep.bad_line == k


def test_reordered_and_inserted_lines_are_named(log_path):
    rows = lines(log_path)
    put(log_path, [*rows[:5], rows[6], rows[5], *rows[7:]])  # swap lines 6 and 7
    assert verify(log_path).bad_line == 6
    put(log_path, [*rows[:5], rows[2], *rows[5:]])  # a copy of line 3 inserted as line 6
    assert verify(log_path).bad_line == 6
    put(log_path, [*rows[:5], b'{"seq":6,"note":"not a record"}', *rows[5:]])
    assert verify(log_path).bad_line == 6
    put(log_path, [*rows[:5], b"garbage", *rows[5:]])  # junk in the middle is no crash: nothing acknowledges it
    rep = verify(log_path)
    assert rep.bad_line == 6 and "not a record" in rep.problem


def test_truncation(log_path):
    rows = lines(log_path)
    # cut back to the second checkpoint (line 8): the head file holds the final one (line 11)
    put(log_path, rows[:8])
    rep = verify(log_path)
    assert rep.status == "tampered" and rep.bad_line == 9 and "cut" in rep.problem
    # cut in the middle of a line: where the log stops (and still cut, by the head file)
    log_path.write_bytes(b"\n".join(rows)[:-40])
    rep = verify(log_path)
    assert rep.torn_tail and rep.bad_line == 11 and "cut" in rep.problem
    # without the head file, a cut back to a checkpoint reads as a log that was not closed
    log_path.with_name("audit.log.head").unlink()
    put(log_path, rows[:8])
    rep = verify(log_path)
    assert rep.status == "ok" and not rep.closed and "not closed cleanly" in rep.end
    assert any("no head file" in n for n in rep.notes)


def test_unsigned_tail_is_reported_as_such(tmp_path):
    """What verify cannot prove: records after the last checkpoint (server running or killed) may be cut unseen."""
    path = tmp_path / "a.log"
    log = write_log(path, n=4, close=False)
    rep = verify(path)
    assert rep.status == "unproven" and rep.signed_through == 4 and rep.lines == 6 and "lines 5-6" in rep.end
    put(path, lines(path)[:5])  # one unsigned record cut off: indistinguishable from a kill (documented)
    assert verify(path).status == "unproven"
    os.close(log.fd)


def test_a_log_cut_while_the_server_was_down_is_refused_at_restart(log_path):
    put(log_path, lines(log_path)[:8])
    with pytest.raises(AuditError, match="no longer holds its last signed checkpoint"):
        AuditLog(log_path)


def test_another_public_key_is_refused(tmp_path, log_path):
    pem = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "other.pub").write_bytes(pem)
    rep = verify(log_path, tmp_path / "other.pub")
    assert rep.bad_line == 1 and "another key" in rep.problem


# --- the commands ---

def run_cli(capsys, *argv) -> tuple[int, str]:
    """camelid.cli.main in this process: (exit code, stdout); stderr is kept in run_cli.err."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, run_cli.err = capsys.readouterr()
    return code, out


def test_verify_command_exit_codes(capsys, tmp_path, log_path):
    code, out = run_cli(capsys, "audit", "verify", str(log_path))
    assert code == 0 and "OK: closed cleanly" in out
    rows = lines(log_path)
    put(log_path, rows[:4] + rows[5:])
    code, out = run_cli(capsys, "audit", "verify", str(log_path))
    assert code == 1 and "TAMPERED at line 5" in out
    code, out = run_cli(capsys, "audit", "verify", "--json", str(log_path))
    assert code == 1 and json.loads(out)["bad_line"] == 5
    path = tmp_path / "open.log"
    log = write_log(path, n=1, close=False)
    code, out = run_cli(capsys, "audit", "verify", str(path))
    assert code == 3 and "END NOT SIGNED" in out
    os.close(log.fd)


def test_show_filters(capsys, log_path):
    code, out = run_cli(capsys, "audit", "show", "--json", str(log_path))
    recs = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [r["i"] for r in recs] == list(range(7))
    assert out.encode().splitlines() == [r for r in lines(log_path) if b'"type":"request"' in r]  # as stored
    _, out = run_cli(capsys, "audit", "show", "--json", "--key", "alice", str(log_path))
    assert [json.loads(x)["i"] for x in out.splitlines()] == [1, 3, 5]
    _, out = run_cli(capsys, "audit", "show", "--json", "--since", "2026-12-02", str(log_path))
    assert [json.loads(x)["i"] for x in out.splitlines()] == [1, 3, 5]
    _, out = run_cli(capsys, "audit", "show", "--json", "--until", "2026-12-02T00:00Z", str(log_path))
    assert [json.loads(x)["i"] for x in out.splitlines()] == [0, 2, 4, 6]
    _, out = run_cli(capsys, "audit", "show", str(log_path), "--key", "bob")
    table = out.splitlines()
    assert table[0].split()[:3] == ["LINE", "TIME", "KEY"] and len(table) == 5 and all(" bob " in r for r in table[1:])


def test_since_accepts_dates_times_and_ages():
    assert parse_since("2026-12-01") == "2026-12-01T00:00:00.000Z"
    assert parse_since("2026-12-01T10:30+02:00") == "2026-12-01T08:30:00.000Z"
    assert parse_since("2026-12-01T10:30:00Z") == "2026-12-01T10:30:00.000Z"
    assert parse_since("2h") < parse_since("1h") < parse_since("30s")
    with pytest.raises(AuditError, match="not a time"):
        parse_since("yesterday")


def test_user_mistakes_are_one_line(capsys, tmp_path):
    # the real command once (no traceback, one line on stderr), then the same main() in this process
    assert "no public key file" in one_line_error(camelid_cli("audit", "verify", str(tmp_path / "none.log"), timeout=120))

    def error(*argv) -> str:
        code, _ = run_cli(capsys, *argv)
        err = [x for x in run_cli.err.splitlines() if x.strip()]
        assert code not in (0, None) and len(err) == 1 and err[0].startswith("camelid: error:"), err
        return err[0]

    (tmp_path / "x.log").write_text("hello\n")
    assert "not a time" in error("audit", "show", str(tmp_path / "x.log"), "--since", "soon")
    assert "invalid choice" in error("audit", "bogus")
    assert "need --audit-log" in error("serve", "--audit-text")
    assert "no such folder" in error("serve", "--audit-log", str(tmp_path / "no" / "a.log"))
    assert "must be >= 1" in error("serve", "--audit-log", str(tmp_path / "x.log"), "--audit-checkpoint", "0")
    (tmp_path / "x.log.key").write_text("{}")
    os.chmod(tmp_path / "x.log.key", 0o600)
    assert "not a camelid audit key" in error("serve", "--audit-log", str(tmp_path / "x.log"))
    os.unlink(tmp_path / "x.log.key")
    assert "exists but its key" in error("serve", "--audit-log", str(tmp_path / "x.log"))
    load_key(tmp_path / "x.log.key", create=True)
    assert "not a camelid audit log" in error("serve", "--audit-log", str(tmp_path / "x.log"))


def test_a_log_whose_first_line_was_torn_restarts(tmp_path):
    path = tmp_path / "a.log"
    load_key(tmp_path / "a.log.key", create=True)
    path.write_bytes(b'{"seq":1,"prev":"00')  # killed inside the very first write
    AuditLog(path).close()
    rep = verify(path)
    assert rep.status == "ok" and rep.lines == 3 and "line 1 is a record torn by a crash" in rep.notes[0]


def test_show_match_finds_a_text_through_the_keyed_hashes(capsys, tmp_path):
    path = tmp_path / "a.log"
    log = AuditLog(path)
    for i, (prompt, answer) in enumerate([("hello", "hi"), ("bye", "hello"), ("other", "text")]):
        log.record({"i": i, "prompt_hmac": log.key.keyed_hash(prompt), "answer_hmac": log.key.keyed_hash(answer)})
    log.close()
    _, out = run_cli(capsys, "audit", "show", "--json", "--match", "hello", str(path))
    assert [json.loads(x)["i"] for x in out.splitlines()] == [0, 1]
    _, out = run_cli(capsys, "audit", "show", "--json", "--match", "hell", str(path))
    assert out == ""
