"""`camelid audit verify FILE` and `camelid audit show FILE`, and serve's --audit-* flags.

verify exits 0 when every line is intact and signed, 1 when it found tampering (it names the first bad line),
3 when the log is intact as far as it goes but its end is not signed (the server is running or was killed, or the
tail was cut: the records after the last checkpoint cannot be proven complete).
"""

from __future__ import annotations

import argparse
import json
import sys

from .audit import CHECKPOINT_EVERY, CHECKPOINT_SECONDS, FSYNC_POLICIES

EXIT_TAMPERED, EXIT_UNPROVEN = 1, 3


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """serve's audit flags."""
    g = parser.add_argument_group("audit log")
    g.add_argument("--audit-log", default=None, metavar="FILE",
                   help="append one JSON line per request to FILE, hash-chained, with signed checkpoints "
                        "(`camelid audit verify FILE` checks it); prompts and answers as keyed hashes unless --audit-text")
    g.add_argument("--audit-text", action="store_true", help="store the prompt and answer text in the audit log too")
    g.add_argument("--audit-key", default=None, metavar="FILE",
                   help="the log's signing and hashing keys (made on first use, mode 0600; default LOG.key beside the "
                        "log). The public key is written to LOG.pub")
    g.add_argument("--audit-checkpoint", type=int, default=CHECKPOINT_EVERY, metavar="N",
                   help=f"sign the chain every N records (default {CHECKPOINT_EVERY}), at most {CHECKPOINT_SECONDS:g} s "
                        "after a record while serving, and at shutdown")
    g.add_argument("--audit-fsync", choices=FSYNC_POLICIES, default="checkpoint",
                   help="fsync the log at every checkpoint (default), or after every record (always). A killed server "
                        "loses no record either way; fsync is what survives a power loss")


def serve_options(args: argparse.Namespace) -> dict | None:
    """The AuditLog arguments from serve's flags (None without --audit-log). The audit flags need --audit-log."""
    from .errors import CamelidError

    if args.audit_log is None:
        if args.audit_text or args.audit_key:
            raise CamelidError("--audit-text and --audit-key need --audit-log FILE")
        return None
    return {"path": args.audit_log, "key_path": args.audit_key, "text": args.audit_text,
            "checkpoint_every": args.audit_checkpoint, "fsync": args.audit_fsync}


def add_parser(sub) -> argparse.ArgumentParser:
    """`camelid audit verify|show` (a command with sub-commands: camelid.cli.parse_args descends into them)."""
    p = sub.add_parser("audit", help="check (verify) or read (show) a server's audit log")
    inner = p.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    v = inner.add_parser("verify", help="check the hash chain and the signed checkpoints; name the first bad line")
    v.add_argument("file", metavar="FILE", help="the audit log")
    v.add_argument("--public-key", default=None, metavar="PEM",
                   help="the log's public key (default FILE.pub; a copy kept elsewhere proves more)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_verify)
    s = inner.add_parser("show", help="print the request records of an audit log")
    s.add_argument("file", metavar="FILE", help="the audit log")
    s.add_argument("--key", default=None, metavar="NAME", help="only this API key's requests")
    s.add_argument("--since", default=None, metavar="TIME",
                   help="only requests at or after TIME: an ISO date or time (UTC unless it has a zone) or an age (30m, 2h, 7d)")
    s.add_argument("--until", default=None, metavar="TIME", help="only requests before TIME (as --since)")
    s.add_argument("--blocked", action="store_true", help="only requests a policy rule or the guard blocked")
    s.add_argument("--match", default=None, metavar="TEXT",
                   help="only requests whose prompt or answer is exactly TEXT (through the keyed hashes: needs --audit-key)")
    s.add_argument("--audit-key", default=None, metavar="FILE", help="the log's key file, for --match (default FILE.key)")
    s.add_argument("--json", action="store_true", help="the records as JSON lines, as stored")
    s.set_defaults(func=cmd_show)
    p.commands = {"verify": v, "show": s}
    return p


def cmd_verify(args: argparse.Namespace) -> None:
    from .audit import verify

    rep = verify(args.file, args.public_key)
    if args.json:
        print(json.dumps(rep.to_dict()))
    else:
        print(f"{rep.path}: {rep.lines} lines, {rep.records} request records, {rep.checkpoints} signed checkpoints "
              f"(key {rep.key})")
        for note in rep.notes:
            print(f"  note: {note}")
        if rep.status == "tampered":
            print(f"TAMPERED at line {rep.bad_line}: {rep.problem}")
        else:
            print(f"{'OK' if rep.status == 'ok' else 'INTACT, END NOT SIGNED'}: {rep.end}")
    if rep.status != "ok":
        sys.exit(EXIT_TAMPERED if rep.status == "tampered" else EXIT_UNPROVEN)


def _blocked(rec: dict) -> bool:
    return any(isinstance(v, dict) and v.get("action") == "block" for v in rec.get("verdicts") or [])


def _verdicts(rec: dict) -> str:
    out = []
    for v in rec.get("verdicts") or []:
        if isinstance(v, dict):
            what = v.get("rule") or ",".join(v.get("categories") or []) or v.get("source") or "?"
            out.append(f"{v.get('action')}:{v.get('stage')}:{what}")
    return " ".join(out) or "-"


def cmd_show(args: argparse.Namespace) -> None:
    from .audit import dumps, load_key, parse_since, read_records, sibling

    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until) if args.until else None
    wanted = None
    if args.match is not None:
        key = load_key(args.audit_key or sibling(args.file, ".key"))
        wanted = key.keyed_hash(args.match)
    rows = read_records(args.file)
    if not args.json:
        print(f"{'LINE':>6} {'TIME':24} {'KEY':12} {'STATUS':>6} {'ENDPOINT':22} {'MODEL':20} {'TOKENS':>9} "
              f"{'MS':>8}  FINISH / VERDICTS")
    skipped = []
    for line, rec in rows:
        if rec is None:
            skipped.append(line)
            continue
        if rec.get("type") != "request":
            continue
        t = str(rec.get("time", ""))
        if (since and t < since) or (until and t >= until) or (args.key is not None and rec.get("key") != args.key):
            continue
        if args.blocked and not _blocked(rec):
            continue
        if wanted is not None and wanted not in (rec.get("prompt_hmac"), rec.get("answer_hmac")):
            continue
        if args.json:
            print(dumps(rec).decode())  # the line as stored
            continue
        tokens = rec.get("tokens") or {}
        tok = f"{tokens.get('prompt_tokens', '-')}/{tokens.get('completion_tokens', '-')}" if tokens else "-"
        ms = f"{rec['latency_ms']:.1f}" if isinstance(rec.get("latency_ms"), (int, float)) else "-"
        finish = ",".join(str(f) for f in rec.get("finish_reason") or [] if f) or "-"
        if rec.get("client_gone"):
            finish += " (client gone)"
        print(f"{line:>6} {t:24} {str(rec.get('key') or '-'):12.12} {str(rec.get('status')):>6} "
              f"{str(rec.get('endpoint')):22.22} {str(rec.get('model') or '-'):20.20} {tok:>9} "
              f"{ms:>8}  {finish} {_verdicts(rec)}")
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (" ..." if len(skipped) > 5 else "")
        print(f"camelid: note: {len(skipped)} lines are not records (lines {shown}); `camelid audit verify` says why",
              file=sys.stderr)
