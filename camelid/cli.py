"""The `camelid` command. One sub-command = one small function that parses and calls into the package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CamelidError

# ---------------------------------------------------------------- helpers


def _model_and(args_list: list[str], what: str) -> tuple[str | None, str]:
    """`[MODEL] X` positional pair: one value is X alone, two are MODEL and X."""
    if len(args_list) == 1:
        return None, args_list[0]
    if len(args_list) == 2:
        return args_list[0], args_list[1]
    shown = " ".join(repr(a) for a in args_list)
    raise CamelidError(f"expected [MODEL] {what}, got {len(args_list)} arguments ({shown}): took {args_list[0]!r} as MODEL "
                       f"and {args_list[1]!r} as {what}, and {len(args_list) - 2} more are left over; "
                       f"quote a {what.lower()} of several words")


def _resolve_positional(model: str | None, rest: str, what: str) -> Path:
    """The store's path for MODEL; when MODEL came as the first of two positionals and is no model, the error says
    how the line was read (`camelid run hello world` takes 'hello' as MODEL)."""
    from .errors import ModelNotFoundError
    from .store import resolve

    try:
        return resolve(model)
    except ModelNotFoundError as e:
        if model is None:
            raise
        hint = "MODEL comes first" if Path(rest).exists() else f"quote a {what.lower()} of several words"
        raise ModelNotFoundError(f"{e} (took {model!r} as MODEL and {rest!r} as {what}; {hint})") from None


def _sampling(args: argparse.Namespace, model_path: Path):
    """Sampling from the flags; temperature and top-p not given come from the model's recommended defaults."""
    from .sampling import SamplingParams
    from .store import recommended_sampling

    defaults = recommended_sampling(model_path)
    temperature = args.temperature if args.temperature is not None else defaults.get("temperature", 0.6)
    top_p = args.top_p if args.top_p is not None else defaults.get("top_p", 1.0)
    return SamplingParams(temperature=temperature, top_k=args.top_k, top_p=top_p, min_p=args.min_p,
                          repetition_penalty=args.repeat_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, seed=args.seed)


def _load(model: str | None, args: argparse.Namespace, sampling: bool = True, **options):
    """(LLM, SamplingParams or None); sampling values are checked before the slow load. options go to camelid.load."""
    import torch

    from .api import load
    from .store import resolve

    if getattr(args, "max_tokens", 0) < 0:
        raise CamelidError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    path = model if isinstance(model, Path) else resolve(model)
    params = _sampling(args, path) if sampling else None
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise CamelidError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load(path, quant=_quant(args), adapter=getattr(args, "adapter", None), **options), params


def _drafter(args: argparse.Namespace, llm):
    """--speculate ngram | MODEL: the drafter (a draft model loaded like the model), or None."""
    from .api import load
    from .speculate import make_drafter
    from .store import resolve

    return make_drafter(getattr(args, "speculate", None), llm.model, lambda spec: load(resolve(spec), quant=_quant(args)).model)


def _add_speculate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", default=None, metavar="ngram|MODEL",
                   help="speculative decoding: 'ngram' (prompt lookup; pays off where the answer copies the input) or a "
                        "smaller model sharing the vocabulary (store name or path) as the draft; the same output")


def _quant(args: argparse.Namespace) -> str | None:
    """--reference: the float32 reference path; --quant MODE otherwise (default auto: the fast path)."""
    return None if getattr(args, "reference", False) else getattr(args, "quant", "auto")


def _add_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a LoRA adapter folder (peft's format) applied to the model without merging")


def _add_runtime(p: argparse.ArgumentParser, fast: bool = True) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--quant", choices=("auto", "int8", "int4"), default="auto" if fast else None,
                   help="weights at run time: auto keeps GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K as stored (bf16 products); int8/int4 "
                        f"quantize every linear layer at load (default {'auto' if fast else 'none: the float32 reference path'})")
    g.add_argument("--reference", action="store_true", help="the float32 reference path (every weight dequantized)")


def _stream_out(generation, out=sys.stdout) -> None:
    for piece in generation:
        out.write(piece)
        out.flush()
    c = generation.completion
    if not c.text.endswith("\n"):
        out.write("\n")
    if c.finish_reason == "length" and len(c.token_ids) < generation.request.max_tokens:
        print("camelid: note: the answer reached the end of the context window", file=sys.stderr)


# ---------------------------------------------------------------- sub-commands


def cmd_pull(args: argparse.Namespace) -> None:
    from .store import pull

    print(pull(args.name, force=args.force))


def cmd_list(args: argparse.Namespace) -> None:
    from .store import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'NAME':28} {'SIZE':>9}  {'STATUS':10} DESCRIPTION")
    for r in rows:
        size = f"{r['size'] / 1e6:.0f} MB" if r["size"] else "-"
        print(f"{r['name']:28} {size:>9}  {'pulled' if r['pulled'] else 'available':10} {r['description']}")


def cmd_rm(args: argparse.Namespace) -> None:
    from .store import remove

    print(f"removed {remove(args.name)}")


def cmd_run(args: argparse.Namespace) -> None:
    model, prompt = _model_and(args.args, "PROMPT")
    llm, sampling = _load(_resolve_positional(model, prompt, "PROMPT"), args, cache_mb=0)  # one prompt: nothing to reuse
    options = dict(max_tokens=args.max_tokens, sampling=sampling, stop=args.stop or (), speculate=_drafter(args, llm))
    if args.raw:
        generation = llm.start(llm.encode_prompt(prompt), **options)
    else:
        messages = [{"role": "user", "content": prompt}]
        generation = llm.start(llm.encode_chat(messages, args.system), **options)
    _stream_out(generation)


CHAT_HELP = "commands: /system TEXT (set the system prompt and reset), /reset, /exit (or Ctrl-D); Ctrl-C stops an answer"


def cmd_chat(args: argparse.Namespace) -> None:
    llm, sampling = _load(args.model, args)
    drafter = _drafter(args, llm)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    system = args.system
    history: list[dict] = []
    print(f"camelid chat: {llm.checkpoint.path.name}. {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to quit)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/") and text.split()[0] not in ("//",):
            print(f"(unknown command {text.split()[0]}; {CHAT_HELP})", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            generation = llm.start(llm.encode_chat(history, system), max_tokens=args.max_tokens, sampling=sampling,
                                   speculate=drafter)
        except CamelidError as e:
            history.pop()
            print(f"camelid: error: {e} (use /reset to start over)", file=sys.stderr)
            continue
        shown = []
        try:
            for piece in generation:
                shown.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(shown)})


def cmd_tokenize(args: argparse.Namespace) -> None:
    from .formats import read

    model, text = _model_and(args.args, "TEXT")
    tok = read(_resolve_positional(model, text, "TEXT")).tokenizer
    print(json.dumps(tok.encode(text, special=args.special, bos=args.bos)))


def cmd_perplexity(args: argparse.Namespace) -> None:
    from .eval.perplexity import perplexity
    from .progress import Progress

    model, file = _model_and(args.args, "FILE")
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CamelidError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CamelidError(f"cannot read {path} as UTF-8 text: {e}") from None
    llm, _ = _load(_resolve_positional(model, file, "FILE"), args, sampling=False)
    ids = llm.tokenizer.encode(text, special=False, bos=True)
    if len(ids) < 2:
        raise CamelidError(f"{path}: needs at least two tokens of text")
    if args.chunks:
        from .eval.perplexity import chunked_perplexity

        n_ctx = args.context or 512  # llama-perplexity's default -c
        bar = Progress(max(1, len(ids) // n_ctx), "scoring", unit="chunks")
        try:
            bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None  # llama.cpp: BOS first in each chunk
            r = chunked_perplexity(llm.model, ids, n_ctx, args.max_chunks, bos, progress=bar.update)
        except ValueError as e:
            raise CamelidError(str(e)) from None
    else:
        bar = Progress(len(ids) - 1, "scoring", unit="tokens")
        try:
            r = perplexity(llm.model, ids, args.context, progress=bar.update)
        except ValueError as e:
            raise CamelidError(str(e)) from None
    bar.close()
    if args.json:
        print(json.dumps({"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "scored": r.scored, "windows": r.windows,
                          **({"chunks": r.windows, "stderr": r.stderr} if args.chunks else {})}))
    elif args.chunks:
        print(f"perplexity {r.perplexity:.4f} +/- {r.stderr:.5f}  tokens {r.tokens}  (llama.cpp-style: {r.windows} chunks of "
              f"{args.context or 512}, scored {r.scored}, mean NLL {r.nll:.4f} nats)")
    else:
        print(f"perplexity {r.perplexity:.4f}  tokens {r.tokens}  (scored {r.scored}, windows {r.windows}, mean NLL {r.nll:.4f} nats)")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Write MODEL quantized to --to at --out, then (unless --no-eval) its quality against the source."""
    from .formats import WRITE_TYPES, read, write
    from .progress import Progress
    from .store import resolve

    if args.to not in WRITE_TYPES:
        raise CamelidError(f"--to must be one of {', '.join(WRITE_TYPES)}, got {args.to!r}")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CamelidError(f"{out} exists (use --force to replace it)")
    text = None
    if not args.no_eval and args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CamelidError(f"cannot read {args.text} as UTF-8 text: {e}") from None
    source = resolve(args.model)
    if out.resolve() == Path(source).resolve():
        raise CamelidError(f"--out {out} is the source model itself")
    ckpt = read(source)
    if not out.parent.is_dir():
        raise CamelidError(f"--out {out}: no such folder {out.parent}")
    bar = Progress(len(ckpt.tensors), f"writing {args.to}", unit="tensors")
    try:
        summary = write(ckpt, out, args.to, overwrite=args.force, progress=lambda *_: bar.update(1))
    except OSError as e:
        raise CamelidError(f"cannot write {out}: {e.strerror or e}") from None
    bar.close()
    result = {"source": str(source), **summary}
    if not args.no_eval:
        from .eval.quality import DEFAULT_TEXT, compare_checkpoints

        try:
            quality, same = compare_checkpoints(ckpt, read(out), text or DEFAULT_TEXT, args.context)
        except ValueError as e:
            raise CamelidError(str(e)) from None
        result.update(quality=quality.to_dict(), same_tokenization=same, text=args.text or "built-in paragraph")
    if args.json:
        print(json.dumps(result))
        return
    print(f"wrote {summary['path']} ({summary['type']}, {summary['bytes'] / 1e6:.1f} MB)")
    if not args.no_eval:
        q = result["quality"]
        print(f"perplexity  source {q['source_perplexity']:.4f}  quantized {q['quantized_perplexity']:.4f}  "
              f"({q['scored']} tokens, {result['text']})")
        print(f"KL(source || quantized)  mean {q['kl_mean']:.5f}  max {q['kl_max']:.4f} nats/token;  "
              f"top-1 agreement {100 * q['top1_agreement']:.1f}%")
        if not same:
            print("camelid: warning: the written tokenizer encodes the text differently from the source's", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    """Write MODEL (with --adapter merged in) as a GGUF file or HF folder, or the adapter alone as a GGUF LoRA."""
    from .exporter import check_options, export
    from .progress import Progress

    check_options(args.to, args.type)  # before the slow read
    bar: list[Progress] = []

    def progress(name: str, done: int, total: int) -> None:
        if not bar:
            bar.append(Progress(total, f"writing {args.to}", unit="tensors"))
        bar[0].update(1)

    summary = export(args.model, args.adapter, args.to, args.out, args.type, args.force, progress)
    if bar:
        bar[0].close()
    if args.json:
        print(json.dumps(summary))
        return
    merged = f", adapter {summary['adapter']} merged" if "adapter" in summary and args.to != "gguf-lora" else ""
    print(f"wrote {summary['path']} ({summary['format']} {summary['type']}{merged}, {summary['bytes'] / 1e6:.1f} MB)")


def _info_rows(ckpt) -> list[tuple[str, str]]:
    from .chat import template_for
    from .config import llama4_summary

    cfg = ckpt.config
    tok = ckpt.tokenizer
    rs = cfg.rope_scaling
    scaling = f", llama3 scaling x{rs.factor:g} from {rs.original_max_position_embeddings}" if rs else ""
    _, template_src = template_for(tok)
    name = lambda i: tok.backend.id_to_token(i) if i is not None else "-"  # noqa: E731
    return [
        ("path", str(ckpt.path)),
        ("format", ckpt.format + (f" ({ckpt.info['format_reason']})" if ckpt.info.get("format_reason") else "")),
        ("name", str(ckpt.info.get("name") or "-")),
        ("architecture", cfg.arch + (f" ({ckpt.info['architecture']})" if ckpt.info.get("architecture") else "")),
        ("parameters", f"{cfg.param_count() / 1e6:.1f} M"),
        ("quantization", str(ckpt.info.get("quantization") or "-")),
        ("tensor types", ", ".join(ckpt.info.get("tensor_types", [])) or "-"),
        ("layers", str(cfg.n_layers)),
        ("model dim", str(cfg.dim)),
        ("heads / kv heads", f"{cfg.n_heads} / {cfg.n_kv_heads} (head dim {cfg.head_dim})"),
        ("feed-forward dim", str(cfg.hidden_dim)),
        *(llama4_summary(cfg) if cfg.arch == "llama4" else []),
        *((("vision tower", str(ckpt.info["vision_tower"])),) if "vision_tower" in ckpt.info else ()),
        ("vocabulary", f"{cfg.vocab_size} ({'byte-level BPE' if tok.kind == 'bpe' else 'SentencePiece'})"),
        ("context length", str(cfg.max_seq_len)),
        ("rope", f"theta {cfg.rope_theta:g}{scaling}"),
        ("norm eps", f"{cfg.norm_eps:g}"),
        ("tied embeddings", "yes" if cfg.tie_embeddings else "no"),
        ("bos / eos", f"{name(tok.bos_id)} / {name(tok.eos_id)} (adds BOS: {'yes' if tok.add_bos else 'no'})"),
        ("stop tokens", ", ".join(name(i) for i in sorted(tok.stop_ids))),
        ("chat template", template_src),
    ]


def cmd_info(args: argparse.Namespace) -> None:
    from .formats import read
    from .store import resolve

    if args.model and not Path(args.model).exists():
        try:
            from . import presets
        except ImportError:
            presets = None
        if presets is not None and args.model in presets.PRESETS:
            info = presets.describe(args.model)
            print(json.dumps(info, indent=1) if args.json else presets.format_description(info))
            return
    ckpt = read(resolve(args.model))
    rows = _info_rows(ckpt)
    if args.json:
        print(json.dumps({"config": ckpt.config.to_dict(), "format": ckpt.format, "info": ckpt.info, **dict(rows)}, indent=1, default=str))
        return
    for k, v in rows:
        print(f"{k:18} {v}")
    if args.template:
        from .chat import template_for

        print("\n" + template_for(ckpt.tokenizer)[0])


# ---------------------------------------------------------------- parser


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int = 512) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N", help=f"most tokens to generate (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 is greedy (default: the model's recommendation, else 0.6)")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling (default: the model's, else 0.9)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens (default 0: off)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P", help="drop tokens below P x the top probability")
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R", help="repetition penalty (>1 discourages)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="X")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for reproducible sampling")
    g.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads")
    _add_runtime(p)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="camelid", description="Run, chat with and inspect LLaMA-family models.")
    parser.add_argument("--version", action="version", version=f"camelid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    model_help = "store name or path to a model file/folder (default: smollm2-135m-instruct)"

    p = sub.add_parser("pull", help="fetch a model into the store")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct", help="store name or URL")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="models in the store and known names")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="remove a model from the store")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("run", help="answer one prompt, streamed to stdout")
    p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help=model_help + "; then the prompt")
    p.add_argument("--raw", action="store_true", help="plain completion, without the chat template")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    _add_adapter(p)
    _add_sampling(p)
    _add_speculate(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with history")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    _add_adapter(p)
    _add_sampling(p)
    _add_speculate(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("tokenize", help="print token ids as a JSON list")
    p.add_argument("args", nargs="+", metavar="[MODEL] TEXT")
    p.add_argument("--special", action="store_true", help="parse special-token names in the text")
    p.add_argument("--bos", action="store_true", help="prepend BOS if the model uses one")
    p.set_defaults(func=cmd_tokenize)

    from .embed_cli import add_parser as add_embed  # the command lives in its own module

    add_embed(sub)

    p = sub.add_parser("perplexity", help="perplexity of a text file")
    p.add_argument("args", nargs="+", metavar="[MODEL] FILE")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="window length (default: the context length; 512 with --chunks, as llama-perplexity)")
    p.add_argument("--chunks", action="store_true",
                   help="llama-perplexity's figure: non-overlapping chunks of --context tokens, second half of each scored")
    p.add_argument("--max-chunks", type=int, default=None, metavar="N", help="with --chunks: at most N chunks (its --chunks N)")
    p.add_argument("--threads", type=int, default=None, metavar="N")
    p.add_argument("--json", action="store_true")
    _add_runtime(p, fast=False)  # perplexity is a measurement: the reference path unless asked
    p.set_defaults(func=cmd_perplexity)

    from .eval.run import add_parser as add_eval

    add_eval(sub, model_help)

    p = sub.add_parser("quantize", help="write a quantized copy (GGUF or camelid int8/int4 folder) and report its quality")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--to", required=True, metavar="TYPE", help="q8_0, q4_0, q4_1, f16 (GGUF file) or int8, int4 (folder)")
    p.add_argument("--out", required=True, metavar="PATH", help="the file or folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--text", metavar="FILE", help="text to measure quality on (default: a built-in English paragraph)")
    p.add_argument("--context", type=int, default=None, metavar="N", help="evaluation window (default: the context length)")
    p.add_argument("--no-eval", action="store_true", help="write only; skip the quality comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a model (with a LoRA adapter merged) as GGUF or HF, or the adapter as GGUF LoRA")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--adapter", metavar="DIR", help="a peft LoRA adapter folder to merge (or, with --to gguf-lora, to convert)")
    p.add_argument("--to", required=True, metavar="FORMAT",
                   help="gguf (a file llama.cpp loads), hf (a Hugging Face folder), gguf-lora (the adapter for llama.cpp --lora)")
    p.add_argument("--out", required=True, metavar="PATH", help="the file or folder to write")
    p.add_argument("--type", metavar="TYPE", help="weights: gguf f16 (default), f32, q8_0, q4_0, q4_1; hf f32, f16, bf16 "
                   "(default: the source's float precision); gguf-lora f32 (default), f16")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="architecture, sizes, quantization, context, template")
    p.add_argument("model", nargs="?", default=None, help=model_help + ", or a preset name such as llama-3.1-8b")
    p.add_argument("--json", action="store_true")
    p.add_argument("--template", action="store_true", help="also print the chat template")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="load time, first token, prefill and decode speed, peak memory (vs peers)")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--json", action="store_true", help="one JSON object: load_s, ttft_s, prefill_tok_s, decode_tok_s, peak_rss_mb")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for every engine (default: all cores, at most 8)")
    p.add_argument("--vs", action="append", choices=("llama.cpp", "transformers"), metavar="PEER",
                   help="also measure llama.cpp or transformers on the same file in the same run (repeatable)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per figure; medians are shown (default 3)")
    _add_runtime(p)
    p.set_defaults(func=cmd_bench)

    from .compiled import add_parser as compile_parser  # camelid compile: the AOTInductor decode step

    compile_parser(sub)
    _add_finetune(sub)
    from .train import pretrain, tokenizer_train

    tokenizer_train.add_parser(sub)
    pretrain.add_parsers(sub)  # prepare, pretrain

    from .keys_cli import add_parser as add_keys  # camelid keys add|list|revoke

    add_keys(sub)
    from .audit_cli import add_parser as add_audit  # camelid audit verify|show

    add_audit(sub)
    from .serve import add_arguments as serve_arguments  # flags only: the server's modules load on use

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    parser.commands = dict(sub.choices)  # name -> sub-parser, for parse_args' intermixed reading
    return parser


def cmd_finetune(args: argparse.Namespace) -> None:
    """LoRA / QLoRA / full fine-tuning: camelid.train.finetune with the flags as they are."""
    import os

    import torch

    from .train.finetune import finetune

    if args.threads is not None:
        if args.threads < 1:
            raise CamelidError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    r = finetune(args.model, args.data, args.out, method=args.method, steps=args.steps, epochs=args.epochs, lr=args.lr,
                 rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=args.targets, use_rslora=args.rslora,
                 seq_len=args.seq_len, batch_tokens=args.batch_tokens, batch_size=args.batch_size, grad_accum=args.grad_accum,
                 val=args.val, val_frac=args.val_frac, save_every=args.save_every, eval_every=args.eval_every,
                 warmup_steps=args.warmup, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                 seed=args.seed, resume=args.resume, train_on_prompt=args.train_on_prompt, skip_bad=args.skip_bad,
                 pack=not args.no_pack, precision=args.precision, activation_checkpointing=args.grad_checkpoint,
                 compile=args.compile, system=args.system)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun: rank 0 speaks
        return
    what = "model" if r.method == "full" else "adapter"
    val = f", validation loss {r.final_val_loss:.4f}" if r.final_val_loss is not None else ""
    loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
    print(f"wrote the {what} to {r.out} ({r.steps} steps, loss {loss}{val}; metrics in {r.out / 'metrics.jsonl'})")


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="LoRA, QLoRA or full fine-tuning on your own data (JSONL chat, instruction or text)")
    p.add_argument("model", nargs="?", default=None, help="store name or path of the base model (default: smollm2-135m-instruct)")
    p.add_argument("--data", required=True, metavar="FILE",
                   help='JSONL of {"messages": [...]}, {"instruction", "input", "output"} or {"text"} records, or a .txt file')
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the adapter (peft format) or model, metrics.jsonl, checkpoint/")
    p.add_argument("--method", choices=("lora", "qlora", "full"), default="lora",
                   help="lora: float base; qlora: LoRA over the base kept quantized; full: every weight (default lora)")
    g = p.add_argument_group("length")
    g.add_argument("--steps", type=int, default=None, metavar="N", help="optimizer steps")
    g.add_argument("--epochs", type=float, default=None, metavar="E", help="passes over the data (default 1, unless --steps)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 for LoRA/QLoRA, 2e-5 for full)")
    g.add_argument("--warmup", type=int, default=None, metavar="N", help="warmup steps before the cosine decay (default 10%%, at most 100)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, metavar="X", help="gradient clipping (default 1.0)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per optimizer step (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8, metavar="R", help="LoRA rank (default 8)")
    g.add_argument("--alpha", type=float, default=16.0, metavar="A", help="LoRA alpha; the scale is alpha/rank (default 16)")
    g.add_argument("--dropout", type=float, default=0.05, metavar="P", help="LoRA dropout (default 0.05)")
    g.add_argument("--targets", default=None, metavar="LIST",
                   help="comma-separated of q,k,v,o,gate,up,down (default: all seven; never the output layer)")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scale alpha/sqrt(rank)")
    g = p.add_argument_group("data")
    g.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per sequence (default 512; longer records are an error)")
    g.add_argument("--batch-tokens", type=int, default=None, metavar="N", help="tokens per micro-batch, packed (default: --seq-len)")
    g.add_argument("--batch-size", type=int, default=None, metavar="N", help="sequences per micro-batch (instead of --batch-tokens)")
    g.add_argument("--val", default=None, metavar="FILE", help="validation data, same kinds as --data")
    g.add_argument("--val-frac", type=float, default=None, metavar="F", help="hold out this share of --data for validation")
    g.add_argument("--train-on-prompt", action="store_true", help="also train on the prompt tokens (default: assistant turns only)")
    g.add_argument("--skip-bad", action="store_true", help="skip (and count) bad or too-long records instead of stopping")
    g.add_argument("--no-pack", action="store_true", help="one sample per row, padded (default: pack samples, no attention across them)")
    g.add_argument("--system", default=None, metavar="TEXT", help="system prompt for records that have none")
    g = p.add_argument_group("run")
    g.add_argument("--save-every", type=int, default=None, metavar="N", help="checkpoint every N steps (default: at the end)")
    g.add_argument("--eval-every", type=int, default=None, metavar="N", help="validation loss every N steps (default: 5 times a run)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the CPU or GPU supports it, else float32")
    g.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block (less memory, more time)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each block: about 25 s more at the start on 2 cores (seconds once cached), faster steps after")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads")
    p.set_defaults(func=cmd_finetune)


def cmd_bench(args: argparse.Namespace) -> None:
    import os

    from . import bench
    from .store import resolve

    threads = args.threads or min(os.cpu_count() or 1, 8)
    if threads < 1 or args.repeats < 1:
        raise CamelidError("--threads and --repeats must be >= 1")
    path = str(resolve(args.model))
    try:
        result = bench.run(path, threads, args.vs or [], args.repeats, _quant(args),
                           progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except RuntimeError as e:
        raise CamelidError(str(e)) from None
    print(json.dumps(result, indent=2) if args.json else bench.table(result))


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import main as serve_main

    if serve_main(args):
        sys.exit(1)


class _Parser(argparse.ArgumentParser):
    """argparse with camelid's one-line errors: `camelid: error: ...` and exit status 2."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        hint = f"camelid {command} --help" if command else "camelid --help"
        self.exit(2, f"camelid: error: {message} (see {hint})\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options may come before, between or after a command's positional arguments (as in git, ollama, llama-cli):
    the sub-command's parser reads its line with parse_intermixed_args."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = parser.commands
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None or at > 0 or argv[at] not in commands:
        return parser.parse_args(argv)  # --help, --version, a missing or unknown command: argparse says so
    sub, command = commands[argv[at]], argv[at]
    inner = getattr(sub, "commands", None)  # a command with sub-commands (`camelid tokenizer train`): descend
    rest = argv[at + 1 :]
    if inner is not None and rest and rest[0] in inner:
        sub, command, rest = inner[rest[0]], f"{command} {rest[0]}", rest[1:]
    elif inner is not None:
        return parser.parse_args(argv)  # its --help, or a missing or unknown sub-command: argparse says so
    args = sub.parse_intermixed_args(rest)
    args.command = command
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .heap import keep_freed_heap

    keep_freed_heap()  # a process of camelid's own: freed tensors' memory kept for the next (camelid/heap.py)
    try:
        args.func(args)
    except CamelidError as e:
        print(f"camelid: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # output piped into a command that stopped reading: not an error
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
