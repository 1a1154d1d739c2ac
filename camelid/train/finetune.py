"""`camelid finetune`: LoRA, QLoRA or full fine-tuning of a model on your own data, in one function.

    finetune(model, data, out, method="lora")  ->  OUT/adapter_config.json + adapter_model.safetensors (peft's format)
                                                  or, with method="full", OUT as a Hugging Face model folder

The pieces, each its own module: data.py (records -> token ids and trained-token masks through the same chat
template that run/chat/serve use, packing), lora.py (adapters wrapping the model's linear layers in place),
loop.py (the one training loop that pretraining shares: accumulation, AdamW, warmup + cosine, clipping, bf16
autocast, metrics.jsonl, atomic checkpoints, exact resume, FSDP2 under torchrun). This file only chooses and wires:

- method "lora":  the base on the float reference path, frozen (Q/K/V and gate/up fused, in bfloat16 under bf16
                  autocast: _fuse_frozen_linears); LoRA A/B trained.
- method "qlora": the base kept quantized as stored (GGUF Q4_0/Q4_1/Q8_0, camelid int8/int4; a float base is
                  quantized to int4 at load), frozen; gradients flow through dequantize-on-the-fly; LoRA trained.
- method "full":  every weight copied out of the file's read-only memory map, then all trained.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import CamelidError

METHODS = ("lora", "qlora", "full")
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}


@dataclass
class FinetuneResult:
    out: Path
    method: str
    steps: int
    final_loss: float | None
    final_val_loss: float | None
    trainable_parameters: int
    data: dict = field(default_factory=dict)  # the data report: records, skipped, tokens, trained tokens


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def finetune(model: str | os.PathLike | None = None, data: str | os.PathLike = "", out: str | os.PathLike = "", *,
             method: str = "lora", steps: int | None = None, epochs: float | None = None, lr: float | None = None,
             rank: int = 8, alpha: float = 16.0, dropout: float = 0.05, targets: str | list[str] | None = None,
             use_rslora: bool = False, seq_len: int = 512, batch_tokens: int | None = None, batch_size: int | None = None,
             grad_accum: int = 1, val: str | os.PathLike | None = None, val_frac: float | None = None,
             save_every: int | None = None, eval_every: int | None = None, warmup_steps: int | None = None,
             weight_decay: float = 0.0, max_grad_norm: float = 1.0, seed: int = 0, resume: bool = False,
             train_on_prompt: bool = False, skip_bad: bool = False, pack: bool = True, precision: str = "auto",
             activation_checkpointing: bool = False, compile: bool = False, system: str | None = None,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune `model` (store name or path; default: the default model) on `data` (JSONL of chat conversations,
    instruction records or {"text": ...} lines, or a .txt file) and write the result to `out`.

    Exactly one of steps / epochs (default: 1 epoch). batch_tokens (tokens per micro-batch, packed) or batch_size
    (rows per micro-batch); grad_accum micro-batches per optimizer step. val (a file) or val_frac (a share of data)
    for validation loss every eval_every steps. Checkpoints every save_every steps into OUT/checkpoint (atomic);
    resume=True continues from it exactly. compile: torch.compile each block (loop.compile_blocks), slower to
    start, faster per step. Raises CamelidError (one line) on bad input.
    """
    from ..chat import template_for
    from ..formats import read
    from ..formats.peft import parse_targets
    from ..loader import build_model
    from ..store import resolve
    from . import data as D
    from . import loop

    if method not in METHODS:
        raise CamelidError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if steps is not None and epochs is not None:
        raise CamelidError("give --steps or --epochs, not both")
    for name, value, low in (("--steps", steps, 1), ("--seq-len", seq_len, 8), ("--grad-accum", grad_accum, 1),
                             ("--rank", rank, 1), ("--batch-size", batch_size, 1), ("--batch-tokens", batch_tokens, 8),
                             ("--save-every", save_every, 1), ("--eval-every", eval_every, 1)):
        if value is not None and value < low:
            raise CamelidError(f"{name} must be >= {low}, got {value}")
    if epochs is not None and epochs <= 0:
        raise CamelidError(f"--epochs must be > 0, got {epochs}")
    if batch_size is not None and batch_tokens is not None:
        raise CamelidError("give --batch-tokens or --batch-size, not both")
    if val is not None and val_frac is not None:
        raise CamelidError("give --val or --val-frac, not both")
    if val_frac is not None and not 0 < val_frac < 1:
        raise CamelidError(f"--val-frac must be between 0 and 1, got {val_frac}")
    if not 0 <= dropout < 1:
        raise CamelidError(f"--dropout must be in [0, 1), got {dropout}")
    if lr is not None and lr <= 0:
        raise CamelidError(f"--lr must be > 0, got {lr}")
    try:
        target_names = parse_targets(targets)
    except ValueError as e:
        raise CamelidError(str(e)) from None
    out = Path(out)
    if not str(out):
        raise CamelidError("--out is required: the folder to write the adapter (or model) to")
    data_path = Path(data)
    if not data_path.is_file():
        raise CamelidError(f"no such data file: {data_path}")
    r, world = _rank_world()
    rank0 = r == 0  # under torchrun only rank 0 writes, so only it judges the folder
    has_checkpoint = (out / "checkpoint").exists()
    if resume and not has_checkpoint:
        raise CamelidError(f"--resume: no checkpoint in {out} to continue from")
    if rank0 and not resume and out.exists() and any(out.iterdir()):
        raise CamelidError(f"{out} is not empty (use --resume to continue a run there, or another --out)")

    source = resolve(model)
    ckpt = read(source)
    tokenizer = ckpt.tokenizer
    template, _ = template_for(tokenizer)
    seq_len = min(seq_len, ckpt.config.max_seq_len)

    samples, report = D.load_samples(data_path, tokenizer, template, seq_len=seq_len, train_on_prompt=train_on_prompt,
                                     skip_bad=skip_bad, system=system)
    val_samples: list = []
    if val is not None:
        if not Path(val).is_file():
            raise CamelidError(f"no such validation file: {val}")
        val_samples, _ = D.load_samples(Path(val), tokenizer, template, seq_len=seq_len, train_on_prompt=train_on_prompt,
                                        skip_bad=skip_bad, system=system)
    elif val_frac is not None:
        samples, val_samples = D.split_validation(samples, val_frac, seed)
    if not samples:
        raise CamelidError(f"{data_path}: no training samples left")

    torch.manual_seed(seed)
    if method == "full":
        net = build_model(ckpt, quant=None)
        loop.make_trainable_copy(net)
        net.requires_grad_(True)
    else:
        quantized = any(t.raw is not None for t in ckpt.tensors.values())
        if method == "qlora" and not torch.cuda.is_available():  # the base on the CPU
            from .. import kernels

            kernels.available(build_missing=True)  # camelid's dequantization: once per machine, ~30 s; every step faster
        net = build_model(ckpt, quant=None if method == "lora" else ("auto" if quantized else "int4"))
        if method == "lora":
            bf16 = world == 1 and loop.resolve_precision(precision, torch.device("cpu")) == "bf16"
            _fuse_frozen_linears(net, torch.bfloat16 if bf16 else None)  # one process: FSDP2 wants one dtype a block
        from .lora import apply_lora

        try:
            apply_lora(net, target_names, r=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, seed=seed)
        except ValueError as e:
            raise CamelidError(str(e)) from None
    net.train()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}

    batch_opts = dict(seq_len=seq_len, batch_size=batch_size, batch_tokens=batch_tokens if batch_size is None else None,
                      pack=pack)
    if batch_size is None and batch_tokens is None:
        batch_opts["batch_tokens"] = seq_len
    batches = D.Batches(samples, **batch_opts, shuffle=True, seed=seed, rank=r, world=world)
    val_batches = None
    if val_samples:
        val_batches = lambda: D.Batches(val_samples, **batch_opts, shuffle=False, seed=seed, rank=r,  # noqa: E731
                                        world=world).one_epoch()

    cfg = loop.TrainConfig(steps=steps, epochs=None if steps is not None else (epochs or 1.0), lr=lr or DEFAULT_LR[method],
                           warmup_steps=warmup_steps or 0, warmup_ratio=0.0 if warmup_steps is not None else 0.1,
                           weight_decay=weight_decay, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                           eval_every=eval_every or 0, save_every=save_every or 0, seed=seed, precision=precision,
                           activation_checkpointing=activation_checkpointing, compile=compile)
    if eval_every is None and val_batches is not None:  # validation five times a run by default
        cfg.eval_every = max(1, loop.total_steps(cfg, batches) // 5)

    def save(step: int, out_dir: Path, state: dict[str, torch.Tensor]) -> None:
        """The user-facing artifact beside each checkpoint (rank 0, whole tensors on the CPU)."""
        if method == "full":
            from ..formats.hf_write import write_hf_folder

            write_hf_folder(ckpt, state, out_dir)
        else:
            from ..formats.peft import write_adapter
            from .lora import adapter_from_model

            write_adapter(adapter_from_model(net, base_model=str(source), state=state), out_dir)

    if r == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune.json").write_text(json.dumps({
            "base_model": str(source), "method": method, "data": str(data_path), "val": str(val) if val else None,
            "val_frac": val_frac, "seq_len": seq_len, "rank": rank, "alpha": alpha, "dropout": dropout,
            "targets": list(target_names), "train_on_prompt": train_on_prompt, "pack": pack, "data_report": asdict(report),
            "train": cfg.to_dict()}, indent=1, default=str) + "\n")
    try:
        result = loop.train(net, batches, cfg, out, val_batches=val_batches, trainable=list(trainable.values()), on_save=save,
                            resume=resume, progress=progress)
    except ValueError as e:  # a checkpoint of another run, settings that do not fit the data
        raise CamelidError(str(e)) from None
    return FinetuneResult(out=out, method=method, steps=result.steps, final_loss=result.loss, final_val_loss=result.val_loss,
                          trainable_parameters=sum(p.numel() for p in trainable.values()), data=asdict(report))


def _fuse_frozen_linears(net: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    """Lay out LoRA's frozen float base as the fast path does: Q/K/V and gate/up of every block as one linear each
    (wqkv, w13; lora.py gives a fused layer one adapter segment per projection), optionally stored in `dtype`.

    A product with the concatenated weight computes the same sums as the separate ones (up to the order of the
    additions), in fewer and larger matrix products, and LoRA's A's of a fused layer become one product too.
    dtype bfloat16 (training under bf16 autocast): autocast would cast each float32 weight to the same bfloat16
    values on every forward; storing them so skips 0.1 G parameter casts a step and halves their memory. The
    tied embedding/output matrix and the norms stay as they are (the residual stream stays float32, as with plain
    autocast). Blocks with routed experts (Llama 4) keep their feed-forward as it is.
    """
    from torch import nn

    from ..model import FeedForward

    def one(parts: list[nn.Linear]) -> nn.Linear:
        weight = torch.cat([p.weight.detach().to(dtype or p.weight.dtype) for p in parts])
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        return layer

    for block in net.layers:
        attn, ffn = block.attention, block.feed_forward
        if attn.wqkv is None and isinstance(attn.wq, nn.Linear) and attn.wq.bias is None:
            attn.wqkv, attn.wq, attn.wk, attn.wv = one([attn.wq, attn.wk, attn.wv]), None, None, None
        if isinstance(ffn, FeedForward) and ffn.w13 is None and isinstance(ffn.w1, nn.Linear) and ffn.w1.bias is None:
            ffn.w13, ffn.w1, ffn.w3 = one([ffn.w1, ffn.w3]), None, None
        for m in (attn.wo, getattr(ffn, "w2", None)):
            if dtype is not None and isinstance(m, nn.Linear):
                m.weight.data = m.weight.data.to(dtype)
