"""`camelid keys add|list|revoke`: the API keys of `camelid serve --keys KEYS` (camelid/serve/keys.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    """`camelid keys add|list|revoke ...` (a command with sub-commands: camelid.cli.parse_args descends into them)."""
    p = sub.add_parser("keys", help="API keys for `serve --keys`: add (scopes, limits), list, revoke")
    inner = p.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)

    def file_flag(q: argparse.ArgumentParser) -> None:
        env = os.environ.get("CAMELID_KEYS")
        q.add_argument("--file", required=env is None, default=env, metavar="KEYS",
                       help="the key file (default: $CAMELID_KEYS); `keys add` makes it if missing (mode 0600)")

    a = inner.add_parser("add", help="add a key; prints its secret once (only a hash of it is stored)")
    a.add_argument("name", metavar="NAME", help="the key's name (in the audit log and metrics)")
    file_flag(a)
    g = a.add_argument_group("scopes (default: everything but /metrics)")
    g.add_argument("--models", metavar="M1,M2", help="the models (or adapters) it may use, by the API's model names")
    g.add_argument("--endpoints", metavar="E1,E2",
                   help="chat, completions, embeddings, rerank, moderations, tokenize, models, metrics, or all "
                        "(default: all but metrics)")
    g.add_argument("--categories", metavar="C1,C2",
                   help="the guard categories its requests are checked against (default: the policy's)")
    g = a.add_argument_group("limits (default: none)")
    g.add_argument("--rpm", type=int, metavar="N", help="requests a minute (sliding 60 s)")
    g.add_argument("--tpm", type=int, metavar="N", help="tokens a minute (prompt + completion, sliding 60 s)")
    g.add_argument("--concurrency", type=int, metavar="N", help="requests at once")
    g.add_argument("--max-tokens", type=int, metavar="N", help="most new tokens one request may ask (and its default)")
    g.add_argument("--daily-tokens", type=int, metavar="N", help="tokens a UTC day")
    g.add_argument("--expires", metavar="DATE",
                   help="YYYY-MM-DD (works through that UTC day), an ISO date-time, or a duration: 30d, 12h, 90m")
    a.set_defaults(func=cmd_keys_add)

    ls = inner.add_parser("list", help="the keys, their scopes, limits and status (never a secret)")
    file_flag(ls)
    ls.add_argument("--json", action="store_true", help="one JSON list")
    ls.set_defaults(func=cmd_keys_list)

    r = inner.add_parser("revoke", help="revoke a key (a running server refuses it within about a second)")
    r.add_argument("name", metavar="NAME")
    file_flag(r)
    r.set_defaults(func=cmd_keys_revoke)
    p.commands = {"add": a, "list": ls, "revoke": r}


def cmd_keys_add(args: argparse.Namespace) -> None:
    from .serve.keys import add_key

    key, secret = add_key(args.file, args.name, models=args.models, endpoints=args.endpoints, categories=args.categories,
                          expires=args.expires, rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency,
                          max_tokens=args.max_tokens, daily_tokens=args.daily_tokens)
    print(secret)  # stdout holds the secret alone: SECRET=$(camelid keys add ...)
    print(f"camelid: added the key {key.name!r} to {args.file}; the secret above is shown only now: keep it safe",
          file=sys.stderr)


def _limits(k: dict) -> str:
    shown = [f"{name}={k[f]}" for f, name in (("rpm", "rpm"), ("tpm", "tpm"), ("concurrency", "conc"),
                                              ("max_tokens", "max_tokens"), ("daily_tokens", "daily")) if k[f]]
    return ",".join(shown) or "-"


def cmd_keys_list(args: argparse.Namespace) -> None:
    from .serve.gate import read_ledger
    from .serve.keys import DEFAULT_ENDPOINTS, key_summary, read_keys

    now = time.time()
    today = read_ledger(Path(args.file).with_name(Path(args.file).name + ".usage"), int(now // 86400))
    rows = [{**key_summary(k, now), "tokens_today": today.get(k.name, 0)} for k in read_keys(args.file).values()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'NAME':20} {'STATUS':8} {'SECRET':17} {'MODELS':20} {'ENDPOINTS':28} {'LIMITS':28} {'TODAY':>9} EXPIRES")
    for k in rows:
        models = ",".join(k["models"]) if k["models"] is not None else "all"
        endpoints = "all but metrics" if k["endpoints"] == list(DEFAULT_ENDPOINTS) else ",".join(k["endpoints"])
        print(f"{k['name']:20} {k['status']:8} {k['prefix'] + '...':17} {models:20} {endpoints:28} "
              f"{_limits(k):28} {k['tokens_today']:>9} {k['expires'] or '-'}")


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    from .serve.keys import iso, revoke_key

    key = revoke_key(args.file, args.name)
    print(f"revoked the key {key.name!r} in {args.file} at {iso(key.revoked)}")
