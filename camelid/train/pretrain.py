"""`camelid prepare` and `camelid pretrain`: train a Llama from scratch (or continue one) on your own text.

    camelid tokenizer train corpus/ --vocab-size 4096 --out tok/
    camelid prepare corpus/ --tokenizer tok/ --out data/
    camelid pretrain --preset tiny --data data/ --out my-model/ --steps 1000
    torchrun --nproc_per_node 2 -m camelid pretrain --preset tiny --data data/ --out my-model/   # FSDP2

The steps are taken by the one training loop fine-tuning uses (loop.py: accumulation, AdamW, warmup + cosine,
clipping, bf16 autocast, metrics.jsonl, atomic DCP checkpoints, exact resume, FSDP2 under torchrun). What is
pretraining's own is here: the model built from a preset or a config file with fresh weights (or --init from an
existing model), the data (shards.py: memory-mapped token windows), MFU in the metrics, sample generations and
the loss curve. The output folder is a Hugging Face model folder (config.json, model.safetensors, tokenizer
files), rewritten at every checkpoint, so `camelid run/chat/serve/finetune/perplexity/export OUT` take it directly;
beside it: checkpoint/ (to --resume), metrics.jsonl, loss.png, samples.jsonl, pretrain.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CamelidError

DEFAULT_PROMPT = "The"


@dataclass
class PretrainResult:
    out: Path
    steps: int
    final_loss: float
    final_val_loss: float | None
    parameters: int
    tokens: int
    elapsed_s: float


def model_config(preset: str | None, config: str | os.PathLike | None, vocab_size: int) -> ModelConfig:
    """The architecture from a preset name or a JSON file of ModelConfig fields, with the tokenizer's vocabulary."""
    from ..presets import get

    if (preset is None) == (config is None):
        raise CamelidError("give --preset NAME or --config FILE (one of them)")
    if preset is not None:
        cfg = get(preset).config
    else:
        path = Path(config)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CamelidError(f"--config {path}: {e}") from None
        d = d.get("config", d) if isinstance(d, dict) else d  # `camelid info PRESET --json` output works too
        try:
            d.setdefault("vocab_size", vocab_size)
            cfg = ModelConfig.from_dict(d)
        except (TypeError, ValueError, AttributeError) as e:
            raise CamelidError(f"--config {path}: not a model config ({e})") from None
    return ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": vocab_size})


def init_weights(model: nn.Module, seed: int) -> None:
    """Fresh weights, as GPT-2 / nanoGPT: normal(0, 0.02) for linears and the embedding, the residual projections
    (attention wo, feed-forward w2) scaled down by sqrt(2 * n_layers), norms at one. Seeded: every process alike."""
    gen = torch.Generator().manual_seed(seed)
    std = 0.02
    residual = std / math.sqrt(2 * len(model.layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                s = residual if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)


def _base_checkpoint(cfg: ModelConfig, tokenizer, out: Path):
    """A Checkpoint describing the model's names and shapes, for the HF folder writer."""
    from ..formats import Checkpoint, LazyTensor
    from ..model import Transformer

    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in Transformer(cfg).state_dict().items()}

    def missing(name):
        def load():
            raise RuntimeError(f"{name} was not given")
        return load

    tensors = {n: LazyTensor(s, "F32", missing(n)) for n, s in shapes.items()}
    return Checkpoint(cfg, tensors, tokenizer, "hf", out)


def _sample(cfg: ModelConfig, state: dict, tokenizer, prompt: str, max_tokens: int, seed: int) -> str:
    """Text the model of `state` writes after `prompt` (temperature 0.8, top-k 40, seeded), on the CPU."""
    from ..generate import Request, generate_one
    from ..model import Transformer
    from ..sampling import SamplingParams

    model = Transformer(cfg)
    full = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    model.load_state_dict(full, strict=False)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.eval()
    ids = tokenizer.encode(prompt, bos=True)
    rng = torch.get_rng_state()
    try:
        request = Request(ids, max_tokens, SamplingParams(temperature=0.8, top_k=40, seed=seed), frozenset(tokenizer.stop_ids))
        with torch.no_grad():
            new = list(generate_one(model, request))
    finally:
        torch.set_rng_state(rng)  # sampling must not move the training run's RNG
    return tokenizer.decode(ids[1:] + new if ids and ids[0] == tokenizer.bos_id else ids + new)


def _tensorboard(out: Path):
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def pretrain(data: str | os.PathLike, out: str | os.PathLike, *, preset: str | None = None,
             config: str | os.PathLike | None = None, init: str | None = None, steps: int | None = None,
             epochs: float | None = None, resume: bool = False, seq_len: int | None = None, batch_size: int = 8,
             grad_accum: int = 1, lr: float = 1e-3, min_lr_ratio: float = 0.1, warmup_steps: int | None = None,
             weight_decay: float = 0.1, max_grad_norm: float = 1.0, eval_every: int | None = None,
             eval_batches: int = 16, save_every: int | None = None, precision: str = "auto",
             activation_checkpointing: bool = False, compile: bool = False, seed: int = 0,
             prompt: str = DEFAULT_PROMPT, sample_tokens: int = 48, peak_flops: float | None = None,
             progress: bool = True) -> PretrainResult:
    """Pretrain a model on prepared data (`camelid prepare`) into `out`; see the module docstring.

    Architecture: preset (e.g. "tiny", "llama-3.2-1b") or config (a JSON file of ModelConfig fields), with fresh
    weights; or init (a model: store name, file or folder) to continue pretraining it. The vocabulary is the data's
    tokenizer's. steps (default: one epoch of the data) optimizer steps of grad_accum micro-batches of batch_size x
    seq_len tokens on each process. Validation loss on eval_batches validation batches every eval_every steps;
    a checkpoint, the model folder, a sample and loss.png every save_every steps and at the end.
    Raises CamelidError (one line) on bad input.
    """
    from ..formats.hf_write import write_hf_folder
    from ..model import Transformer
    from . import loop
    from .distributed import setup
    from .flops import flops_per_token, matmul_params, measure_peak
    from .plot import loss_curve_png
    from .shards import TokenBatches, read_meta
    from .tokenizer_train import load_tokenizer

    for name, value, low in (("--steps", steps, 1), ("--seq-len", seq_len, 8), ("--batch-size", batch_size, 1),
                             ("--grad-accum", grad_accum, 1), ("--save-every", save_every, 1),
                             ("--eval-every", eval_every, 1), ("--eval-batches", eval_batches, 0),
                             ("--sample-tokens", sample_tokens, 0)):
        if value is not None and value < low:
            raise CamelidError(f"{name} must be >= {low}, got {value}")
    if not lr > 0:
        raise CamelidError(f"--lr must be > 0, got {lr}")
    if steps is not None and epochs is not None:
        raise CamelidError("give --steps or --epochs, not both")
    out = Path(out)
    ctx = setup("cuda" if torch.cuda.is_available() else "cpu")
    meta = read_meta(data)
    tokenizer = load_tokenizer(Path(data) / meta["tokenizer"])
    record_path = out / "pretrain.json"
    if resume:
        if not record_path.is_file():
            raise CamelidError(f"--resume: {out} holds no pretraining run (no pretrain.json)")
        saved = json.loads(record_path.read_text())
        cfg = ModelConfig.from_dict(saved["model"])
        init = None
    elif ctx.main and out.exists() and any(out.iterdir()):
        raise CamelidError(f"{out} is not empty (use --resume to continue a run there, or another --out)")
    base_ckpt = None
    if init is not None:
        from ..formats import read
        from ..store import resolve

        if preset is not None or config is not None:
            raise CamelidError("--init takes the architecture from the model: give no --preset or --config")
        base_ckpt = read(resolve(init))
        cfg = base_ckpt.config
        probe = "Hello, world! 123"
        if base_ckpt.tokenizer.vocab_size != tokenizer.vocab_size or \
                base_ckpt.tokenizer.encode(probe) != tokenizer.encode(probe):
            raise CamelidError(f"--init {init}: its tokenizer is not the one {data} was prepared with "
                               f"(prepare the data with --tokenizer {init})")
    elif not resume:
        cfg = model_config(preset, config, meta["vocab_size"])
    if cfg.vocab_size < meta["vocab_size"]:
        raise CamelidError(f"the model's vocabulary ({cfg.vocab_size}) is smaller than the data's ({meta['vocab_size']})")
    seq_len = seq_len or min(cfg.max_seq_len, 2048)
    if seq_len > cfg.max_seq_len:
        raise CamelidError(f"--seq-len {seq_len} is longer than the model's context ({cfg.max_seq_len})")

    batches = TokenBatches(data, "train", seq_len=seq_len, batch_size=batch_size, seed=seed, rank=ctx.rank,
                           world=ctx.world)
    val_batches = None
    if eval_batches:
        val = TokenBatches(data, "val", seq_len=seq_len, batch_size=batch_size, seed=seed, rank=ctx.rank,
                           world=ctx.world, shuffle=False)
        val_batches = val.validation(eval_batches) or None

    if base_ckpt is not None:
        from ..loader import build_model

        model = build_model(base_ckpt)
        loop.make_trainable_copy(model, dtype=torch.float32)
    else:
        model = Transformer(cfg)
        init_weights(model, seed)
    model.train().requires_grad_(True)
    model.to(ctx.device)

    if steps is None and epochs is None:
        epochs = 1.0
    cfg_train = loop.TrainConfig(steps=steps, epochs=epochs, lr=lr, min_lr_ratio=min_lr_ratio,
                                 warmup_steps=warmup_steps if warmup_steps is not None else 0,
                                 warmup_ratio=0.0 if warmup_steps is not None else 0.05, weight_decay=weight_decay,
                                 betas=(0.9, 0.95), grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                                 eval_every=eval_every or 0, save_every=save_every or 0, seed=seed, precision=precision,
                                 activation_checkpointing=activation_checkpointing, compile=compile)
    try:
        cfg_train.validate()
    except ValueError as e:
        raise CamelidError(str(e)) from None
    total = loop.total_steps(cfg_train, batches)
    if eval_every is None and val_batches is not None:
        cfg_train.eval_every = max(1, total // 10)
    if save_every is None:
        cfg_train.save_every = max(1, total // 5)

    precision_used = loop.resolve_precision(precision, ctx.device)
    fpt = flops_per_token(cfg, seq_len)
    if peak_flops is None and ctx.main:
        peak_flops = measure_peak(torch.bfloat16 if precision_used == "bf16" else torch.float32, ctx.device,
                                  seconds=0.5)
    tb = _tensorboard(out) if ctx.main else None
    base = _base_checkpoint(cfg, base_ckpt.tokenizer if base_ckpt is not None else tokenizer, out)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            record_path.write_text(json.dumps({
                "model": cfg.to_dict(), "preset": preset, "config": str(config) if config else None, "init": init,
                "data": str(data), "seq_len": seq_len, "batch_size": batch_size, "world": ctx.world,
                "parameters": cfg.param_count(), "matmul_parameters": matmul_params(cfg), "flops_per_token": fpt,
                "flop_formula": "6 * matmul_params + 12 * n_layers * dim * seq_len", "peak_flops": peak_flops,
                "precision": precision_used, "train": cfg_train.to_dict()}, indent=1) + "\n")

    def on_log(record: dict) -> None:
        record["mfu"] = record["tokens_per_s"] * fpt / (peak_flops * ctx.world) if peak_flops else None
        if tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss"):
                if record.get(key) is not None:
                    tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", record[key], record["step"])

    def on_save(step: int, out_dir: Path, state: dict[str, torch.Tensor]) -> None:
        write_hf_folder(base, state, out_dir, dtype="f32")
        if sample_tokens:
            text = _sample(cfg, state, tokenizer, prompt, sample_tokens, seed + step)
            with open(out_dir / "samples.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")
            if progress:
                print(f"\ncamelid: sample at step {step}: {text!r}", file=sys.stderr, flush=True)
        metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        loss_curve_png(metrics, out_dir / "loss.png")

    try:
        result = loop.train(model, batches, cfg_train, out, val_batches=val_batches, on_save=on_save, on_log=on_log,
                            resume=resume, progress=progress)
    except ValueError as e:  # a checkpoint of another run, data that does not fit
        raise CamelidError(str(e)) from None
    finally:
        if tb is not None:
            tb.close()
    return PretrainResult(out=out, steps=result.steps, final_loss=result.loss, final_val_loss=result.val_loss,
                          parameters=cfg.param_count(), tokens=result.tokens, elapsed_s=result.elapsed_s)


# --- the commands ----------------------------------------------------------------------------------------------------


def add_parsers(sub) -> None:
    """`camelid prepare` and `camelid pretrain`."""
    p = sub.add_parser("prepare", help="tokenize text, Markdown or JSONL files into training shards")
    p.add_argument("paths", nargs="+", metavar="FILES_OR_DIRS", help="text, Markdown or JSONL ('text') files, or folders")
    p.add_argument("--tokenizer", required=True, metavar="T", help="a tokenizer folder (camelid tokenizer train) or a model")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for meta.json and the .bin shards")
    p.add_argument("--val-frac", type=float, default=0.05, metavar="F", help="share of the tokens held out for validation")
    p.add_argument("--shard-tokens", type=int, default=None, metavar="N", help="tokens per shard file (default 128 Mi)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="train a model from scratch (or continue one) on prepared data; FSDP2 under torchrun")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, metavar="NAME", help="architecture by name: tiny, small, medium, llama-3.2-1b, ...")
    g.add_argument("--config", default=None, metavar="FILE", help="architecture as a JSON file of model config fields")
    g.add_argument("--init", default=None, metavar="MODEL", help="continue pretraining this model instead of fresh weights")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, metavar="DIR", help="a folder made by `camelid prepare`")
    g.add_argument("--out", required=True, metavar="DIR", help="the model folder to write (and checkpoint/, metrics.jsonl, loss.png)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, metavar="N", help="optimizer steps (default: one epoch)")
    g.add_argument("--epochs", type=float, default=None, metavar="E", help="passes over the data instead of --steps")
    g.add_argument("--seq-len", type=int, default=None, metavar="T", help="tokens per row (default: the model's context, at most 2048)")
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="rows per micro-batch on each process")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warmup then cosine)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, metavar="R", help="the cosine ends at lr * R")
    g.add_argument("--warmup-steps", type=int, default=None, metavar="N", help="linear warmup (default: 5%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--max-grad-norm", type=float, default=1.0, metavar="X", help="clip the gradient norm to X")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=None, metavar="N", help="validation loss every N steps (default: 10 times a run)")
    g.add_argument("--eval-batches", type=int, default=16, metavar="N", help="validation batches (0: no validation)")
    g.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="checkpoint, model folder, sample and loss.png every N steps (default: 5 times a run)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="start of the sample generations")
    g.add_argument("--sample-tokens", type=int, default=48, metavar="N", help="tokens per sample (0: no samples)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the CPU or GPU supports it, else float32")
    g.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block (less memory, more time)")
    g.add_argument("--compile", action="store_true", help="torch.compile each block (slow to start, faster steps)")
    g.add_argument("--peak-flops", type=float, default=None, metavar="F", help="peak FLOP/s for MFU (default: measured here)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads")
    p.set_defaults(func=cmd_pretrain)


def cmd_prepare(args) -> None:
    from .shards import DEFAULT_SHARD_TOKENS, prepare, print_summary

    meta = prepare(args.paths, args.tokenizer, args.out, val_frac=args.val_frac,
                   shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, progress=True)
    for problem in meta["problems"]:
        print(f"camelid: warning: {problem}", file=sys.stderr)
    print_summary(meta, args.out)


def cmd_pretrain(args) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise CamelidError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    r = pretrain(args.data, args.out, preset=args.preset, config=args.config, init=args.init, steps=args.steps,
                 epochs=args.epochs, resume=args.resume, seq_len=args.seq_len, batch_size=args.batch_size,
                 grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
                 weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                 eval_batches=args.eval_batches, save_every=args.save_every, precision=args.precision,
                 activation_checkpointing=args.grad_checkpoint, compile=args.compile, seed=args.seed,
                 prompt=args.prompt, sample_tokens=args.sample_tokens, peak_flops=args.peak_flops)
    if int(os.environ.get("RANK", "0")) == 0:
        val = f", validation loss {r.final_val_loss:.4f}" if r.final_val_loss is not None else ""
        print(f"{r.out}: {r.parameters / 1e6:.2f} M parameters, {r.steps} steps, {r.tokens:,} tokens in "
              f"{r.elapsed_s:.0f} s, loss {r.final_loss:.4f}{val}")
