"""`camelid embed [MODEL] TEXT... | --file F [--pooling P] [--json]`: embedding vectors on stdout.

Without --json each text's vector is one line of space-separated numbers (as llama.cpp's llama-embedding prints
them); with --json one object {"model", "pooling", "normalized", "dimensions", "data": [{"index", "text",
"embedding"}]}. The first positional is the MODEL when it names one (a file or folder, a store name or URL),
otherwise every positional is a text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CamelidError

POOLINGS = ("mean", "last", "cls")  # camelid.embed.POOLINGS, without importing torch to build the parser


def add_parser(sub) -> argparse.ArgumentParser:
    """The `embed` sub-command on the CLI's sub-parsers."""
    p = sub.add_parser("embed", help="embedding vectors of texts (the final hidden states, pooled)")
    p.add_argument("args", nargs="*", metavar="[MODEL] TEXT", help="a model (optional: default smollm2-135m-instruct), "
                   "then one or more texts")
    p.add_argument("--file", metavar="F", help="embed each non-empty line of F ('-': stdin) instead of TEXT arguments")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="how token states become one vector (default mean)")
    p.add_argument("--no-normalize", action="store_true", help="keep the raw pooled vector (default: L2-normalised)")
    p.add_argument("--dimensions", type=int, default=None, metavar="N", help="keep the first N components (renormalised)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("runtime")
    g.add_argument("--quant", choices=("auto", "int8", "int4"), default="auto",
                   help="weights at run time (default auto: GGUF quantized weights kept, bf16 products)")
    g.add_argument("--reference", action="store_true", help="the float32 reference path (every weight dequantized)")
    p.set_defaults(func=run)
    return p


def _is_model(name: str) -> bool:
    from . import store

    return (Path(name).expanduser().exists() or store.installed_path(name) is not None or name in store.REGISTRY
            or name.startswith(("hf://", "http://", "https://", "file://")))


def _texts(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    positional = list(args.args)
    model = None
    if positional and (args.file is not None or len(positional) > 1) and _is_model(positional[0]):
        model = positional.pop(0)
    if args.file is not None:
        if positional:
            raise CamelidError(f"give texts either as arguments or with --file, not both (got {positional[0]!r} too)")
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CamelidError(f"no such file: {args.file}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CamelidError(f"cannot read {args.file} as UTF-8 text: {e}") from None
        texts = [line for line in text.splitlines() if line.strip()]
        if not texts:
            raise CamelidError(f"{args.file} has no text to embed (no non-empty line)")
        return model, texts
    if not positional:
        raise CamelidError("nothing to embed: give one or more TEXT arguments, or --file F")
    return model, positional


def run(args: argparse.Namespace) -> None:
    from .api import load
    from .store import resolve

    if args.dimensions is not None and args.dimensions < 1:
        raise CamelidError(f"--dimensions must be >= 1, got {args.dimensions}")
    model, texts = _texts(args)
    path = resolve(model)
    llm = load(path, quant=None if args.reference else args.quant)
    if args.dimensions is not None and args.dimensions > llm.config.dim:
        raise CamelidError(f"--dimensions {args.dimensions}: this model's embeddings have {llm.config.dim}")
    vectors = llm.embed(texts, pooling=args.pooling, normalize=not args.no_normalize, dimensions=args.dimensions)
    if args.json:
        print(json.dumps({"model": model or path.stem, "pooling": args.pooling, "normalized": not args.no_normalize,
                          "dimensions": len(vectors[0]),
                          "data": [{"index": i, "text": t, "embedding": v} for i, (t, v) in enumerate(zip(texts, vectors))]}))
    else:
        for v in vectors:
            print(" ".join(f"{x:.6g}" for x in v))
