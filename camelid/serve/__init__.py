"""`camelid serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

    from camelid.serve import serve
    serve("smollm2-135m-instruct", host="127.0.0.1", port=8000, api_key=None, max_concurrency=8)

The KV cache holds max_concurrency rows of max_seq_len positions, allocated at start: for the default
model (30 layers, 3 kv heads of 64) that is 46 KB per position, so 8 slots x 4096 = 1.5 GB of float32.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# seconds an idle keep-alive connection stays open. Longer than common clients' pool idle time (httpx and the openai
# client 5 s, aiohttp 15 s, Node 4-5 s), so the client always closes first: were the server to close a connection at
# the moment a client reuses it, that request would fail with "Server disconnected without sending a response"
# (uvicorn's own default is 5 s, the same as httpx's: a race). 75 s is nginx's default.
DEFAULT_KEEP_ALIVE = 75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `camelid serve` (the CLI's sub-command uses this, then calls main(args))."""
    parser.add_argument("model", nargs="?", default=None, help="model name in the store, or a path (default: the default model)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=os.environ.get("CAMELID_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $CAMELID_API_KEY)")
    parser.add_argument("--max-concurrency", type=int, default=8, help="sequences decoding at once (KV cache slots; default 8)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="requests waiting for a slot before 429 (default 4 x concurrency)")
    parser.add_argument("--max-seq-len", type=int, default=4096,
                        help="context per slot, prompt + output (default 4096, or the model's if smaller)")
    parser.add_argument("--max-tokens", type=int, default=None, help="most new tokens per request (default: the context)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    parser.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                        help="allow cross-origin requests from ORIGIN (repeatable; '*' for any). Off by default")
    parser.add_argument("--model-id", default=None, help="the model's name in the API (default: the store name or file stem)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.add_argument("--keep-alive", type=float, default=DEFAULT_KEEP_ALIVE, metavar="S",
                        help=f"seconds an idle keep-alive connection stays open (default {DEFAULT_KEEP_ALIVE}: longer than "
                             "clients' pool idle time, so a reused connection is never closed under them)")
    parser.add_argument("--quant", choices=("auto", "int8", "int4"), default="auto",
                        help="weights at run time: auto keeps GGUF Q4_0/Q4_1/Q8_0 quantized (bf16 products); int8/int4 "
                             "quantize every linear layer at load (default auto)")
    parser.add_argument("--reference", action="store_true", help="the float32 reference path (every weight dequantized)")
    parser.add_argument("--adapter", action="append", default=None, metavar="NAME=DIR",
                        help="serve the LoRA adapter folder DIR (peft's format) over the base as model NAME (repeatable; "
                             "a bare DIR is named after its folder). Requests choose by 'model'; the base's name means none")


def parse_adapters(values: list[str] | None, model_id: str) -> dict[str, str]:
    """--adapter values (NAME=DIR or DIR) -> {name: dir}; CamelidError naming a bad value."""
    from ..errors import CamelidError

    out: dict[str, str] = {}
    for value in values or []:
        name, sep, folder = value.partition("=")
        if not sep or "/" in name or os.sep in name:  # a bare folder (a path may hold '=' after a '/')
            name, folder = os.path.basename(os.path.normpath(value)), value
        name, folder = name.strip(), folder.strip()
        if not name or not folder:
            raise CamelidError(f"--adapter {value!r}: expected NAME=DIR (a name and an adapter folder)")
        if name == model_id:
            raise CamelidError(f"--adapter {value!r}: the name {name!r} is the base model's; choose another")
        if name in out:
            raise CamelidError(f"--adapter {value!r}: the name {name!r} is given twice")
        out[name] = folder
    return out


def build_state(model: str | None = None, api_key: str | None = None, max_concurrency: int = 8, max_queue: int | None = None,
                max_seq_len: int = 4096, max_tokens: int | None = None, max_body_bytes: int = 1 << 20,
                model_id: str | None = None, quant: str | None = "auto", adapters: dict[str, str] | None = None):
    """Load the model and make the engine and server state (nothing is started).

    adapters: {name: LoRA adapter folder}, served over the one base; a request picks one by its `model`."""
    from ..chat import template_for
    from ..errors import CamelidError
    from ..formats import read
    from ..loader import build_model
    from ..store import DEFAULT_MODEL, resolve
    from .app import ServerState
    from .engine import Engine
    from .params import Limits

    if max_concurrency < 1 or max_seq_len < 2:
        raise CamelidError("--max-concurrency must be >= 1 and --max-seq-len >= 2")
    path = resolve(model)
    ckpt = read(path)
    if model_id is None:
        model_id = model if model and not os.path.exists(str(model)) else (DEFAULT_MODEL if model is None else path.stem)
    if adapters and model_id in adapters:
        raise CamelidError(f"--adapter name {model_id!r} is the base model's; choose another")
    from ..formats.peft import read_adapter

    loaded = {name: read_adapter(folder) for name, folder in (adapters or {}).items()}  # before the slow load
    net = build_model(ckpt, quant=quant)
    if loaded:
        from ..train.lora import load_adapter

        for name, adapter in loaded.items():
            try:
                load_adapter(net, adapter, name, activate=False)
            except CamelidError as e:
                raise CamelidError(f"adapter {name} ({adapters[name]}): {e}") from None
    engine = Engine(net, ckpt.tokenizer, max_concurrency=max_concurrency, max_seq_len=max_seq_len, max_queue=max_queue)
    limits = Limits(max_seq_len=engine.max_seq_len, max_tokens=min(max_tokens or engine.max_seq_len, engine.max_seq_len),
                    max_n=max_concurrency, max_body_bytes=max_body_bytes, vocab_size=ckpt.tokenizer.vocab_size)
    return ServerState(engine, ckpt.tokenizer, model_id, limits, template_for(ckpt.tokenizer)[0], api_key,
                       adapters=tuple(loaded))


def serve(model_path: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          max_concurrency: int = 8, cors_origins: list[str] | None = None, log_level: str = "info",
          keep_alive: float = DEFAULT_KEEP_ALIVE, **options) -> None:
    """Load a model and serve it until interrupted. options: max_queue, max_seq_len, max_tokens, max_body_bytes, model_id."""
    import uvicorn

    from ..errors import CamelidError
    from .app import create_app

    if keep_alive <= 0:
        raise CamelidError(f"--keep-alive must be > 0 seconds, got {keep_alive:g}")
    state = build_state(model_path, api_key=api_key, max_concurrency=max_concurrency, **options)
    app = create_app(state, cors_origins)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"camelid: warning: serving on {host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    extra = f" with adapters {', '.join(state.adapters)}" if state.adapters else ""
    print(f"camelid: serving {state.model_id}{extra} on http://{host}:{port} ({max_concurrency} slots x "
          f"{state.limits.max_seq_len} tokens)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, timeout_keep_alive=keep_alive)


def main(args: argparse.Namespace) -> int:
    """Run `camelid serve` from parsed flags; user mistakes are one line and exit code 1."""
    from ..errors import CamelidError

    try:
        serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_concurrency=args.max_concurrency,
              cors_origins=args.cors_origin, log_level=args.log_level, max_queue=args.max_queue,
              max_seq_len=args.max_seq_len, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes,
              model_id=args.model_id, quant=None if args.reference else args.quant, keep_alive=args.keep_alive,
              adapters=parse_adapters(args.adapter, args.model_id or "") or None)
    except CamelidError as e:
        print(f"camelid: error: {e}", file=sys.stderr)
        return 1
    return 0
