"""The one training loop: fine-tuning (LoRA, QLoRA, full) and pretraining take their steps here.

They differ in the data, in which parameters are trainable and in the initial weights, never in how a step
is taken, logged or checkpointed. One optimizer step:

    take grad_accum micro-batches; N = number of targets (!= -100) in all of them, summed over all processes
    for each micro-batch: loss = sum of token cross-entropies / N, backward (gradients accumulate)
    clip the gradient norm; AdamW step at the warmup + cosine learning rate; log; maybe validate and save

Dividing by the step's TOTAL target count (not a per-micro-batch mean) makes one process with the global
batch and N processes with a shard each take the same step. Under torchrun FSDP2 averages gradients over
the processes, so each process scales its loss by the process count before backward (the mean of
world * local sums is the global sum).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import cpu_has_native_bf16  # precision auto (also imported from here by tests and bench)
from ..errors import CamelidError, first_line
from ..progress import Progress
from . import checkpoint
from .distributed import DistContext, all_reduce_sum, gather_objects, setup, shard
from .head import linear_cross_entropy

PRECISIONS = ("auto", "bf16", "fp32")


class TrainError(CamelidError, ValueError):
    """A training run that cannot start or continue (bad settings, a checkpoint in the way, a diverged loss)."""


@dataclass
class TrainConfig:
    """Settings of a training run: plain values, serializable with to_dict()/from_dict().

    Length: `steps` optimizer steps, or `epochs` (fractional allowed) of the data, which is
    ceil(epochs * batches.steps_per_epoch / grad_accum) steps (steps_per_epoch counts micro-batches per process).
    Learning rate: linear warmup over warmup_steps (or warmup_ratio of the steps), then cosine decay to
    lr * min_lr_ratio. Weight decay applies to parameters of 2 or more dimensions only (not norms, biases).
    eval_every / save_every: every that many steps (0: only at the end); the last step always validates
    (when validation data is given) and saves. precision: "auto" is bf16 autocast where the device computes
    bf16 natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp32. compile: see compile_blocks.
    """

    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10  # progress lines when stderr is not a terminal
    seed: int = 0
    precision: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (compile_blocks): slower first steps, faster ones after

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

    def validate(self) -> None:
        """Raise TrainError naming the first bad setting."""
        if (self.steps is None) == (self.epochs is None):
            raise TrainError("give exactly one of steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"steps must be at least 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainError(f"epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise TrainError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise TrainError("warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if self.grad_accum < 1:
            raise TrainError(f"grad_accum must be at least 1, got {self.grad_accum}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise TrainError(f"max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm}")
        if min(self.eval_every, self.save_every, self.log_every) < 0:
            raise TrainError("eval_every, save_every and log_every must be >= 0")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class TrainResult:
    """What a run ended with. loss: the last step's training loss; val_loss: the last measured (or None)."""

    steps: int
    loss: float
    val_loss: float | None
    tokens: int
    elapsed_s: float
    out_dir: Path
    metrics_path: Path
    checkpoint_path: Path
    history: list[dict] = field(default_factory=list)  # this run's metrics records (rank 0; empty elsewhere)


# --- precision -----------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    """"bf16" or "fp32" for `precision` ("auto" | "bf16" | "fp32") on `device`."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


# --- model preparation ---------------------------------------------------------------------------------------


def make_trainable_copy(model: nn.Module, names: Iterable[str] | None = None,
                        dtype: torch.dtype | None = None) -> list[nn.Parameter]:
    """Copy the named parameters (default: all) into memory of their own and mark them trainable.

    Float32 weights loaded from a GGUF file are views of its read-only memory map: an optimizer writing into
    them crashes the process. The Parameter objects stay the same (tied weights stay tied), only their storage
    is replaced; dtype casts them too (full fine-tuning wants float32 master weights). Returns the parameters.
    """
    params = dict(model.named_parameters())
    wanted = list(params) if names is None else list(names)
    unknown = [n for n in wanted if n not in params]
    if unknown:
        raise TrainError(f"no parameter named {unknown[0]!r} in the model")
    out, seen = [], set()
    for name in wanted:
        p = params[name]
        if id(p) in seen:
            continue
        seen.add(id(p))
        with torch.no_grad():
            p.data = p.data.to(dtype=dtype or p.dtype, copy=True).contiguous()
        p.requires_grad_(True)
        out.append(p)
    return out


def _read_only_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's read-only mappings (Linux /proc/self/maps; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and "w" not in parts[1]:
            start, end = parts[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _check_writable(model: nn.Module) -> None:
    """A trainable parameter inside a read-only memory map would crash the process at the optimizer's first
    write: say so instead (the fix is make_trainable_copy)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.device.type == "cpu"]
    ranges = _read_only_ranges() if trainable else []
    for name, p in trainable:
        ptr = p.data_ptr()
        if any(start <= ptr < end for start, end in ranges):
            raise TrainError(f"parameter {name} is a view of a read-only memory-mapped file (float32 GGUF weights "
                             "are): copy it first with camelid.train.loop.make_trainable_copy(model)")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (torch.utils.checkpoint,
    use_reentrant=False). Patches the blocks' forward, so parameter names and FSDP2 units are unchanged."""
    from torch.utils.checkpoint import checkpoint as ckpt

    for block in model.layers:
        if getattr(block, "_camelid_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return ckpt(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._camelid_checkpointed = True


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block (regional compilation), for training: Inductor fuses the casts, norms, RoPE,
    SwiGLU and residual adds of forward and backward into a few kernels around the matrix products.

    The blocks are alike, so Dynamo traces one and every block reuses its graph (parameters are inputs): the
    first steps pay the compilation (about 25 s for the default model on 2 cores, a few seconds once Inductor's
    on-disk cache holds it), each later step is faster (docs/performance.md). A second sequence length
    recompiles once with a dynamic length. On the CPU Inductor needs a C++ compiler: without one this is a
    TrainError naming it, before any step. Apply after activation checkpointing and before FSDP2 sharding.
    """
    if _device_of(model).type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # no g++/clang++ on the PATH (or CXX names none)
            raise TrainError(f"--compile needs a C++ compiler for torch.compile on the CPU ({first_line(e)}): "
                             "install g++ or run without --compile") from None
    for block in model.layers:
        if not getattr(block, "_camelid_compiled", False):
            block.compile()
            block._camelid_compiled = True


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError("no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        return torch.optim.AdamW(groups, foreach=True, **kw)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)  # CUDA and (torch >= 2.4) CPU
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=device.type == "cuda", **kw)


# --- schedule ------------------------------------------------------------------------------------------------


def total_steps(cfg: TrainConfig, batches) -> int:
    """Optimizer steps of the run (see TrainConfig)."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * batches.steps_per_epoch / cfg.grad_accum))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return cfg.warmup_steps or round(cfg.warmup_ratio * total)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine down to min_lr_ratio."""
    warm = warmup_steps(cfg, total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# --- metrics -------------------------------------------------------------------------------------------------


class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per optimizer step, flushed per line. On resume from step k the
    lines after k (written after the checkpoint, before a crash) are dropped, so each step has one line."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the crash
                    continue
                if record.get("step", math.inf) <= resume_step:
                    kept.append(line + "\n")
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# --- the step ------------------------------------------------------------------------------------------------


def head_weight(model: nn.Module, ctx: DistContext, precision: str) -> torch.Tensor | None:
    """The output layer's weight for the fused output-and-loss step (head.py), in the products' type when it is
    frozen: cast once per run rather than once per forward, and a quantized head (QLoRA's) dequantized once (57 MB
    in bfloat16 for the default model) rather than run on its kernel with exact rows every step. None where the
    model's own output layer must run (under FSDP2, whose hooks gather the weight inside the model's forward; or a
    model without a plain one)."""
    from ..quant import QuantOutput

    output = getattr(model, "output", None)
    if ctx.world == 1 and isinstance(output, QuantOutput):  # QLoRA: a frozen quantized head, dequantized once
        return output.dense_weight(torch.bfloat16 if precision == "bf16" else torch.float32)
    if ctx.world > 1 or not isinstance(output, nn.Linear) or output.bias is not None:
        return None
    weight = output.weight
    if not weight.requires_grad and precision == "bf16":
        return weight.detach().to(torch.bfloat16)
    return weight


def _forward_loss(model: nn.Module, batch, device: torch.device, precision: str,
                  head: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the token cross-entropies of `batch` (targets -100 ignored), in float32. The output layer runs only at
    the positions that have a target (the assistant's tokens of a chat record, say): the same loss and gradients
    as all logits with ignore_index, without the [T, vocabulary] products and their memory elsewhere. With `head`
    (head_weight's) the output layer and the loss are one chunked step (head.linear_cross_entropy)."""
    kw = {} if batch.segments is None else {"segments": batch.segments.to(device, non_blocking=True)}
    targets = batch.targets.to(device, non_blocking=True)
    wanted = targets != -100
    every = bool(wanted.all())  # pretraining: every position (and the compiled model keeps one static graph)
    picked = targets.flatten() if every else targets[wanted]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(batch.tokens.to(device, non_blocking=True), positions=batch.positions.to(device, non_blocking=True),
                    logits_at=None if every else wanted, hidden=head is not None, **kw)
        # hidden states [B,T,D] / logits [B,T,V] at every position, or [N,D] / [N,V] at the wanted ones
        if head is not None:  # the products in autocast's type (bf16 here), else the weight's
            return linear_cross_entropy(out.flatten(0, -2), head, picked)
    return F.cross_entropy(out.float().flatten(0, -2), picked, reduction="sum")


def _grad_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, ctx: DistContext, precision: str,
             head: torch.Tensor | None = None) -> float:
    """Mean cross-entropy per target token over `batches`, over all processes (each passes its own shard; every
    process must have the same number of batches, since each forward is a collective under FSDP2)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for batch in batches:
        totals[0] += _forward_loss(model, batch, ctx.device, precision, head).double()
        totals[1] += int((batch.targets != -100).sum())
    model.train(was_training)
    all_reduce_sum(totals, ctx)
    if totals[1] == 0:
        raise TrainError("the validation data has no target tokens")
    return float(totals[0] / totals[1])


def _trainable_full_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The trainable parameters by state-dict name (a tied weight under each of its names), whole and on the
    CPU: gathered from every process's shard under FSDP2 (a collective), detached views in one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = ctx.world > 1
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=whole, cpu_offload=whole,
                                                                 ignore_frozen_params=True))
    return {name: t.detach() for name, t in state.items()}


def train(
    model: nn.Module,
    batches,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    val_batches: Callable[[], Iterable] | list | None = None,
    trainable: Iterable[nn.Parameter] | None = None,
    on_save: Callable[[int, Path, dict[str, torch.Tensor]], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train `model` on `batches` for cfg's steps or epochs; metrics and checkpoints go into out_dir.

    model: a camelid Transformer (or any module with `.layers` blocks and forward(tokens, positions=, segments=)
        returning logits [B,T,V]); on the device it trains on. Under torchrun it is sharded here with FSDP2;
        every process must hold the same initial weights (same seed or the same checkpoint).
    batches: a Batches (iterable of Batch, endless, rank-sharded, with state_dict()/load_state_dict()).
    val_batches: validation data, a list of Batch or a callable returning a fresh iterable (this process's shard).
    trainable: the parameters to train (default: those with requires_grad); every other parameter is frozen.
    on_save(step, out_dir, state): called on rank 0 after each checkpoint (and at the end) with the trainable
        parameters by name, whole and on the CPU: write user-facing artifacts (an adapter) there.
    on_log(record): called on rank 0 with each step's metrics record before it is written; may add keys (mfu).
    resume: continue from out_dir/checkpoint exactly (data position, RNG, optimizer, step). Without it, a
        checkpoint already in out_dir is an error rather than overwritten.
    progress: draw a progress bar on stderr (rank 0).
    """
    cfg.validate()
    ctx = setup(_device_of(model))
    out = Path(out_dir)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    found = checkpoint.find(out)
    if resume and found is None:
        raise TrainError(f"{out}: no checkpoint to resume from")
    if not resume and found is not None:
        raise TrainError(f"{out} already holds a checkpoint: resume it, or choose another output folder")

    if trainable is not None:
        chosen = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
    _check_writable(model)
    total = total_steps(cfg, batches)
    precision = resolve_precision(cfg.precision, ctx.device)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        compile_blocks(model)
    if ctx.world > 1:
        _check_same_weights(model, ctx)
        shard(model, ctx)
    optimizer = _optimizer(model, cfg, ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    head = head_weight(model, ctx, precision)

    step, tokens, targets_seen, elapsed = 0, 0, 0, 0.0
    if resume:
        state = checkpoint.load(found, model, optimizer, ctx)
        step, tokens, targets_seen, elapsed = state["step"], state["tokens"], state["targets"], state["elapsed_s"]
        batches.load_state_dict(state["data"])
    else:
        checkpoint.seed_everything(cfg.seed + ctx.rank)
    metrics = MetricsLog(out / "metrics.jsonl", step if resume else None) if ctx.main else None
    bar = Progress(total, "train", unit="step", initial=step, every=cfg.log_every) if progress and ctx.main else None

    it = iter(batches)
    was_training = model.training
    model.train()
    history: list[dict] = []
    loss, last_val = math.nan, None
    ckpt_path = found or out / checkpoint.CHECKPOINT
    try:
        while step < total:
            t0 = time.perf_counter()
            micro = [next(it) for _ in range(cfg.grad_accum)]
            lr = lr_at(step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            counts = torch.tensor([sum(int((b.targets != -100).sum()) for b in micro),
                                   sum(_n_tokens(b) for b in micro)], dtype=torch.float64, device=ctx.device)
            all_reduce_sum(counts, ctx)
            n_targets, n_tokens = max(int(counts[0]), 1), int(counts[1])
            loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            for i, batch in enumerate(micro):
                if ctx.world > 1:  # reduce gradients once per optimizer step, after the last micro-batch
                    model.set_requires_gradient_sync(i == len(micro) - 1)
                ce = _forward_loss(model, batch, ctx.device, precision, head)
                (ce * (ctx.world / n_targets)).backward()
                loss_sum += ce.detach().double()
            grad_norm = _grad_norm(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(all_reduce_sum(loss_sum, ctx)) / n_targets
            if not math.isfinite(loss):
                raise TrainError(f"the training loss is {loss} at step {step + 1} (learning rate too high?)")
            step += 1
            tokens += n_tokens
            targets_seen += int(counts[0])
            dt = time.perf_counter() - t0
            elapsed += dt
            record = {"step": step, "epoch": _epoch(batches), "loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens": tokens, "targets": targets_seen,
                      "tokens_per_s": n_tokens / max(dt, 1e-9), "elapsed_s": round(elapsed, 3)}
            if val_batches is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                last_val = evaluate(model, val_batches() if callable(val_batches) else val_batches, ctx, precision, head)
                record["val_loss"] = last_val
            if ctx.main:
                if on_log is not None:
                    on_log(record)
                metrics.write(record)
                history.append(record)
                if bar is not None:
                    val = f" val {last_val:.4f}" if last_val is not None else ""
                    bar.update(1, status=f"loss {loss:.4f}{val} {tokens / max(elapsed, 1e-9):.0f} tok/s")
            if (cfg.save_every and step % cfg.save_every == 0) or step == total:
                trainer = {"step": step, "tokens": tokens, "targets": targets_seen, "elapsed_s": elapsed,
                           "data": _global_data_state(batches, ctx), "metrics_lines": step}
                ckpt_path = checkpoint.save(out, model, optimizer, trainer, ctx, config=cfg.to_dict())
                if on_save is not None:
                    state = _trainable_full_state(model, ctx)
                    if ctx.main:
                        on_save(step, out, state)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    return TrainResult(steps=step, loss=loss, val_loss=last_val, tokens=tokens, elapsed_s=elapsed, out_dir=out,
                       metrics_path=out / "metrics.jsonl", checkpoint_path=ckpt_path, history=history)


def _n_tokens(batch) -> int:
    """Tokens of `batch` that are not padding (its n_tokens when it counts them), else all of its positions."""
    return getattr(batch, "n_tokens", 0) or batch.tokens.numel()


def _epoch(batches) -> float | int | None:
    """Epochs consumed: the fractional `epochs_done` where the data gives it, else its `epoch`."""
    done = getattr(batches, "epochs_done", None)
    return round(done, 4) if done is not None else getattr(batches, "epoch", None)


def _check_same_weights(model: nn.Module, ctx: DistContext) -> None:
    """Every process must start from the same weights (FSDP2 keeps each process's shard of its own copy)."""
    with torch.no_grad():
        sums = [float(p.detach().double().sum()) for p in model.parameters()]
    if any(other != sums for other in gather_objects(sums, ctx)):
        raise TrainError("the processes hold different initial weights: seed the initialization alike or load "
                         "the same checkpoint on every process")


def _global_data_state(batches, ctx: DistContext) -> dict:
    """The data position, checked to be the same on every process: a per-process position would not reshard
    to another process count (interop-facts.md), so Batches must keep a global one."""
    state = batches.state_dict()
    if ctx.world > 1 and any(s != state for s in gather_objects(state, ctx)):
        raise TrainError("the data position differs between processes: Batches.state_dict() must be global")
    return state


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

