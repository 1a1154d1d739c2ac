"""`camelid serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

    from camelid.serve import serve
    serve("smollm2-135m-instruct", host="127.0.0.1", port=8000, api_key=None, max_concurrency=8)

The KV cache holds max_concurrency rows of max_seq_len positions, allocated at start: for the default
model (30 layers, 3 kv heads of 64) that is 46 KB per position, so 8 slots x 4096 = 1.5 GB of float32.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# seconds an idle keep-alive connection stays open. Longer than common clients' pool idle time (httpx and the openai
# client 5 s, aiohttp 15 s, Node 4-5 s), so the client always closes first: were the server to close a connection at
# the moment a client reuses it, that request would fail with "Server disconnected without sending a response"
# (uvicorn's own default is 5 s, the same as httpx's: a race). 75 s is nginx's default.
DEFAULT_KEEP_ALIVE = 75
DEFAULT_CACHE_MB = 1024  # the default model's KV is 46 KB a token: about 22,000 cached prompt tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `camelid serve` (the CLI's sub-command uses this, then calls main(args))."""
    parser.add_argument("model", nargs="*", default=[], metavar="MODEL",
                        help="model name in the store, or a path (default: the default model); several as NAME=MODEL "
                             "(a request's 'model' picks one, loaded on demand)")
    parser.add_argument("--models-dir", default=None, metavar="DIR",
                        help="offer every GGUF file and model folder in DIR, named by file stem or folder name")
    parser.add_argument("--max-loaded", type=int, default=2, metavar="N",
                        help="with several models: most loaded at once; the least recently used idle one is unloaded (default 2)")
    parser.add_argument("--memory-mb", type=float, default=0, metavar="N",
                        help="with several models: MiB of weights and KV slots all loaded models may take (default 0: no limit)")
    parser.add_argument("--model-keep-alive", default="5m", metavar="DURATION",
                        help="with several models: how long an idle model stays loaded (-1 forever, 0 unload at once; "
                             "a request's keep_alive overrides it; default 5m)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=os.environ.get("CAMELID_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $CAMELID_API_KEY)")
    parser.add_argument("--keys", default=None, metavar="KEYS",
                        help="API keys with scopes and limits from the key file KEYS (`camelid keys add`); re-read when "
                             "it changes, no restart (with --api-key too, that key stays unrestricted)")
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
    parser.add_argument("--speculate", default="none", metavar="ngram|none|MODEL",
                        help="speculative decoding for requests that do not say (a request's 'speculate' overrides it) of "
                             "rows decoding alone: ngram = prompt lookup; MODEL = a smaller draft model with the same "
                             "vocabulary (a store name, a path, or one of the served NAMEs), loaded once; greedy output "
                             "is unchanged, sampled output keeps its distribution (default none)")
    parser.add_argument("--pooling", choices=("mean", "last", "cls"), default="mean",
                        help="how /v1/embeddings pools the final hidden states over a text's tokens when a request "
                             "does not say (default mean)")
    from ..audit_cli import add_serve_arguments as audit_arguments

    audit_arguments(parser)  # --audit-log, --audit-text, --audit-key, --audit-checkpoint, --audit-fsync
    parser.add_argument("--cache-mb", type=float, default=DEFAULT_CACHE_MB, metavar="N",
                        help=f"MiB of prompt KV kept for reuse by later requests and turns (default {DEFAULT_CACHE_MB}; "
                             "0 turns the prompt cache off). Reuse is exact: the output never changes")
    # the content policy (camelid/serve/policy.py)
    parser.add_argument("--policy", default=None, metavar="POLICY.toml",
                        help="content rules ([[rule]] pattern/on/action) and guard settings, checked on every prompt and "
                             "answer, streamed ones included")
    parser.add_argument("--guard", default=None, metavar="MODEL",
                        help="a guard model prompted in Llama Guard 3/4's format (S1-S14 and the policy's categories) on "
                             "prompts and answers, and behind /v1/moderations; if it fails, requests fail closed")
    parser.add_argument("--guard-version", type=int, choices=(3, 4), default=None,
                        help="the guard's prompt format (default: from its vocabulary)")


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
                model_id: str | None = None, quant: str | None = "auto", adapters: dict[str, str] | None = None,
                pooling: str = "mean", cache_mb: float = DEFAULT_CACHE_MB, store=None, speculate: str = "none",
                draft: tuple[str, object] | None = None, draft_optional: bool = False):
    """Load the model and make the engine and server state (nothing is started).

    adapters: {name: LoRA adapter folder}, served over the one base; a request picks one by its `model`.
    speculate: "none", "ngram" or "draft", what requests that do not say get. draft: (name, model) from load_draft;
    one whose vocabulary differs from this model's is an error, or with draft_optional a warning and no draft."""
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
    if cache_mb < 0:
        raise CamelidError(f"--cache-mb must be >= 0, got {cache_mb:g}")
    path = resolve(model)
    ckpt = read(path)
    if model_id is None:
        model_id = model if model and not os.path.exists(str(model)) else (DEFAULT_MODEL if model is None else path.stem)
    if draft is not None and draft[1].config.vocab_size != ckpt.config.vocab_size:  # checked before the slow load
        problem = (f"the draft model {draft[0]} has {draft[1].config.vocab_size} tokens in its vocabulary and "
                   f"{model_id} {ckpt.config.vocab_size}: speculation needs the same vocabulary")
        if not draft_optional:
            raise CamelidError(f"--speculate {draft[0]}: {problem}")
        print(f"camelid: warning: {problem}; {model_id} runs without it", file=sys.stderr)
        draft, speculate = None, ("none" if speculate == "draft" else speculate)
    if adapters and model_id in adapters:
        raise CamelidError(f"--adapter name {model_id!r} is the base model's; choose another")
    from ..formats.peft import read_adapter

    loaded = {name: read_adapter(folder) for name, folder in (adapters or {}).items()}  # before the slow load
    net = build_model(ckpt, quant=quant, reuse=True)
    if loaded:
        from ..train.lora import load_adapter

        for name, adapter in loaded.items():
            try:
                load_adapter(net, adapter, name, activate=False)
            except CamelidError as e:
                raise CamelidError(f"adapter {name} ({adapters[name]}): {e}") from None
    from ..compiled import attach
    from ..prompt_cache import BlockStore, PromptCache, mb_to_bytes

    attach(net, path, quant)  # the compiled decode step, when `camelid compile` has built one (not with adapters)
    store = store if store is not None else BlockStore(mb_to_bytes(cache_mb))
    prompt_cache = PromptCache(store, f"{model_id}|{path}|{quant}")
    engine = Engine(net, ckpt.tokenizer, max_concurrency=max_concurrency, max_seq_len=max_seq_len, max_queue=max_queue,
                    prompt_cache=prompt_cache, draft_model=draft[1] if draft is not None else None)
    limits = Limits(max_seq_len=engine.max_seq_len, max_tokens=min(max_tokens or engine.max_seq_len, engine.max_seq_len),
                    max_n=max_concurrency, max_body_bytes=max_body_bytes, vocab_size=ckpt.tokenizer.vocab_size,
                    speculate=speculate, draft=draft[0] if draft is not None else None)
    template = template_for(ckpt.tokenizer)[0]
    if store.enabled:
        warn_reuse(model_id, template, ckpt.tokenizer)
    return ServerState(engine, ckpt.tokenizer, model_id, limits, template, api_key,
                       adapters=tuple(loaded), pooling=pooling)


def load_draft(spec: str, quant: str | None, models: dict[str, str] | None = None):
    """`--speculate SPEC` -> ("none" | "ngram" | "draft", (name, draft model) or None). SPEC names a draft model by
    store name, path, or one of the served NAMEs; it is loaded once and shared by every served model's engine."""
    if spec in ("none", "ngram"):
        return spec, None
    from ..errors import CamelidError
    from ..formats import read
    from ..loader import build_model
    from ..store import resolve

    source = (models or {}).get(spec, spec)
    try:
        return "draft", (spec, build_model(read(resolve(source)), quant=quant, reuse=True))
    except CamelidError as e:
        raise CamelidError(f"--speculate {spec}: {e}") from None


def warn_reuse(model_id: str, template: str, tokenizer) -> None:
    """One line on stderr when a model's chat template defeats the prompt cache between turns."""
    from ..chat import prefix_reuse_problem

    problem = prefix_reuse_problem(template, tokenizer)
    if problem:
        print(f"camelid: warning: {model_id}: its chat template limits prompt reuse between turns: {problem}",
              file=sys.stderr)


def parse_models(values: list[str], models_dir: str | None) -> dict[str, str] | None:
    """The positional MODELs and --models-dir as {name: source}; None for the one-model server (zero or one bare MODEL)."""
    from ..errors import CamelidError

    if models_dir is None and len(values) <= 1 and not any(_named(v) for v in values):
        return None
    out: dict[str, str] = {}
    for value in values:
        if not _named(value):
            raise CamelidError(f"{value!r}: with several models give each as NAME=MODEL")
        name, _, source = value.partition("=")
        if name.strip() in out:
            raise CamelidError(f"the model name {name.strip()!r} is given twice")
        out[name.strip()] = source.strip()
    if models_dir is not None:
        from .registry import models_in

        if not os.path.isdir(models_dir):
            raise CamelidError(f"--models-dir {models_dir}: not a folder")
        found = models_in(models_dir)
        if not found and not out:
            raise CamelidError(f"--models-dir {models_dir}: no GGUF file or model folder in it")
        for name, path in found.items():
            out.setdefault(name, path)
    return out


def _named(value: str) -> bool:
    name, sep, source = value.partition("=")
    return bool(sep and name.strip() and source.strip() and "/" not in name and os.sep not in name)


def build_registry(models: dict[str, str], max_loaded: int, memory_mb: float, keep_alive: str, **options):
    """The first model's state (loaded) and the registry of all of them."""
    from ..errors import CamelidError
    from ..prompt_cache import BlockStore, mb_to_bytes
    from .params import ApiError
    from .registry import Registry, parse_keep_alive

    if max_loaded < 1 or memory_mb < 0:
        raise CamelidError("--max-loaded must be >= 1 and --memory-mb >= 0")
    try:
        default_keep = parse_keep_alive(keep_alive if not keep_alive.lstrip("-").replace(".", "").isdigit() else float(keep_alive))
    except ApiError as e:
        raise CamelidError(f"--model-keep-alive: {e.message}") from None
    cache_mb = options.pop("cache_mb", DEFAULT_CACHE_MB)
    if cache_mb < 0:
        raise CamelidError(f"--cache-mb must be >= 0, got {cache_mb:g}")
    store = BlockStore(mb_to_bytes(cache_mb))  # one prompt cache budget for every model (keys name the model)
    adapters = options.pop("adapters", None)
    first_name = next(iter(models))
    first = build_state(models[first_name], model_id=first_name, store=store, adapters=adapters, draft_optional=True,
                        **options)

    def build(name: str, source: str):
        state = build_state(source, model_id=name, store=store, draft_optional=True, **options)
        state.metrics = first.metrics
        return state

    registry = Registry(models, build, max_loaded, mb_to_bytes(memory_mb), default_keep)
    registry.add_loaded(first_name, first)
    return first, registry


def serve(model_path: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          max_concurrency: int = 8, cors_origins: list[str] | None = None, log_level: str = "info",
          keep_alive: float = DEFAULT_KEEP_ALIVE, models: dict[str, str] | None = None, max_loaded: int = 2,
          memory_mb: float = 0, model_keep_alive: str = "5m", keys: str | None = None, audit: dict | None = None,
          **options) -> None:
    """Load a model and serve it until interrupted. options: max_queue, max_seq_len, max_tokens, max_body_bytes, model_id.

    models: {name: source} for several models (the first loaded at start, the others on demand).
    keys: the key file of --keys (camelid/serve/keys.py).
    audit: camelid.audit.AuditLog's arguments (path, key_path, text, checkpoint_every, fsync) for an audit log."""
    import uvicorn

    from ..errors import CamelidError
    from .app import create_app

    if keep_alive <= 0:
        raise CamelidError(f"--keep-alive must be > 0 seconds, got {keep_alive:g}")
    from .. import kernels
    from ..threads import in_own_thread  # the loads off the main thread (camelid/threads.py says why)
    from .policy import load_policy

    kernels.available(build_missing=True)  # once per machine (seconds): the prompt cache reuses to the token with it

    policy = in_own_thread(load_policy, options.pop("policy", None), options.pop("guard", None), options.pop("guard_version", None))

    from .keys import KeyStore

    store = KeyStore(keys) if keys is not None else None  # a missing or bad key file is one line, before the slow load
    log = None
    if audit:  # opened before the slow load: a bad log or key fails at once; closed (final checkpoint) at any exit
        from ..audit import AuditLog

        log = AuditLog(**audit)
        atexit.register(log.close)
        print(f"camelid: audit log {log.path}, signed by {log.key.id} (public key {log.pub_path}: keep a copy "
              "elsewhere to verify against)", file=sys.stderr)
    speculate, draft = in_own_thread(load_draft, options.pop("speculate", "none"), options.get("quant", "auto"), models)
    options.update(speculate=speculate, draft=draft)
    registry = None
    if models:
        options.pop("model_id", None)
        state, registry = in_own_thread(build_registry, models, max_loaded, memory_mb, model_keep_alive, api_key=api_key,
                                        max_concurrency=max_concurrency, **options)
    else:
        state = in_own_thread(build_state, model_path, api_key=api_key, max_concurrency=max_concurrency, **options)
    state.keys = store
    if store is not None:
        if not any(k.status(time.time()) == "active" for k in store.keys.values()):
            print(f"camelid: warning: {keys} has no active key: every request but /health will get 401", file=sys.stderr)
    app = create_app(state, cors_origins, registry, audit=log, policy=policy)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key and keys is None:
        print(f"camelid: warning: serving on {host} without --api-key or --keys: anyone who can reach it can use it",
              file=sys.stderr)
    extra = f" with adapters {', '.join(state.adapters)}" if state.adapters else ""
    if registry is not None:
        extra += f" (and on demand: {', '.join(n for n in registry.entries if n != state.model_id)})"
    if draft is not None:
        extra += f"; draft model {draft[0]}"
    print(f"camelid: serving {state.model_id}{extra} on http://{host}:{port} ({max_concurrency} slots x "
          f"{state.limits.max_seq_len} tokens)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, timeout_keep_alive=keep_alive)


def main(args: argparse.Namespace) -> int:
    """Run `camelid serve` from parsed flags; user mistakes are one line and exit code 1."""
    from ..audit_cli import serve_options as audit_options
    from ..errors import CamelidError

    try:
        models = parse_models(args.model, args.models_dir)
        serve(args.model[0] if args.model and not models else None, host=args.host, port=args.port, api_key=args.api_key,
              max_concurrency=args.max_concurrency,
              cors_origins=args.cors_origin, log_level=args.log_level, max_queue=args.max_queue,
              max_seq_len=args.max_seq_len, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes,
              model_id=args.model_id, quant=None if args.reference else args.quant, keep_alive=args.keep_alive,
              adapters=parse_adapters(args.adapter, args.model_id or "") or None, pooling=args.pooling,
              cache_mb=args.cache_mb, speculate=args.speculate, models=models, max_loaded=args.max_loaded,
              memory_mb=args.memory_mb,
              model_keep_alive=args.model_keep_alive, keys=args.keys, audit=audit_options(args),
              policy=args.policy, guard=args.guard, guard_version=args.guard_version)
    except CamelidError as e:
        print(f"camelid: error: {e}", file=sys.stderr)
        return 1
    return 0
