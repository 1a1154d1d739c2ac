"""The training loop (camelid/train/loop.py) and its checkpoints, on tiny random models and stand-in data.

Also a script: `python tests/test_train_loop.py --out DIR ...` runs one tiny training (under torchrun too);
the resume and distributed tests start it in subprocesses and compare the metrics.jsonl files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camelid.config import ModelConfig
from camelid.model import Transformer
from camelid.train import checkpoint
from camelid.train.loop import (
    TrainConfig,
    TrainError,
    cpu_has_native_bf16,
    lr_at,
    make_trainable_copy,
    resolve_precision,
    train,
)

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
VOCAB, SEQ = 64, 12


# --- stand-ins for camelid/train/data.py and lora.py (the contract only) -------------------------------------


@dataclass
class Batch:
    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor | None
    n_targets: int


def toy_batch(index: int, rows: int, seed: int = 0) -> Batch:
    """Global micro-batch `index`: random tokens, next-token targets, a varying number of masked targets."""
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    tokens = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    targets = tokens[:, 1:].clone()
    for r in range(rows):  # mask a random prompt-like prefix: rows train on different target counts
        targets[r, : int(torch.randint(0, SEQ - 2, (1,), generator=g))] = -100
    return Batch(tokens[:, :-1], targets, torch.arange(SEQ).expand(rows, SEQ), None, int((targets != -100).sum()))


class ToyBatches:
    """Endless, deterministic, rank-sharded: process `rank` of `world` takes global micro-batches
    pos + rank, pos + world + rank, ...; the position is a global count, the same on every process.
    An epoch is `per_epoch` global micro-batches (steps_per_epoch: this process's share of them)."""

    def __init__(self, rows: int, rank: int = 0, world: int = 1, seed: int = 0, per_epoch: int = 6) -> None:
        self.rows, self.rank, self.world, self.seed, self.per_epoch = rows, rank, world, seed, per_epoch
        self.steps_per_epoch = per_epoch // world
        self.pos = 0

    @property
    def epoch(self) -> int:
        return self.pos // self.per_epoch

    def __iter__(self):
        while True:
            index = self.pos + self.rank
            self.pos += self.world
            yield toy_batch(index, self.rows, self.seed)

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class ToyLoRA(nn.Module):
    """A frozen linear plus a trainable low-rank add-on (B non-zero, so A and B both get gradients)."""

    def __init__(self, base: nn.Linear, rank: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.dropout(x) @ self.a.t() @ self.b.t()


def tiny_model(seed: int = 0, lora: bool = False, dropout: float = 0.0, tied: bool = False) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=64,
                      tie_embeddings=tied)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.ndim == 2 else 1 + 0.1 * torch.randn_like(p))
    if lora:
        model.requires_grad_(False)
        for block in model.layers:
            block.attention.wq = ToyLoRA(block.attention.wq, dropout=dropout)
            block.attention.wv = ToyLoRA(block.attention.wv, dropout=dropout)
            block.feed_forward.w2 = ToyLoRA(block.feed_forward.w2, dropout=dropout)
    return model


def cfg_for(**kw) -> TrainConfig:
    base = dict(steps=4, lr=1e-2, warmup_steps=1, precision="fp32", log_every=0)
    return TrainConfig(**{**base, **kw})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- configuration and schedule ------------------------------------------------------------------------------


def test_config_round_trip_and_validation():
    cfg = cfg_for(betas=(0.8, 0.95), activation_checkpointing=True)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (dict(steps=None), dict(epochs=1.0), dict(precision="fp16"), dict(grad_accum=0), dict(lr=0.0)):
        with pytest.raises(TrainError):
            cfg_for(**bad).validate()


def test_lr_warmup_then_cosine_to_min():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    ratio = TrainConfig(steps=100, lr=1.0, warmup_ratio=0.2)
    assert lr_at(19, ratio, 100) == pytest.approx(1.0) and lr_at(9, ratio, 100) == pytest.approx(0.5)


# --- the step ------------------------------------------------------------------------------------------------


def test_accumulated_loss_and_gradient_equal_the_whole_batch_mean(tmp_path):
    """grad_accum=2 over micro-batches with different target counts: the logged loss and gradient norm are
    those of the mean cross-entropy over every target of both micro-batches (computed here independently)."""
    model, reference = tiny_model(), tiny_model()
    micro = [toy_batch(0, 2), toy_batch(1, 2)]
    assert micro[0].n_targets != micro[1].n_targets
    tokens, targets = torch.cat([b.tokens for b in micro]), torch.cat([b.targets for b in micro])
    loss = F.cross_entropy(reference(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()

    result = train(model, ToyBatches(rows=2), cfg_for(steps=1, grad_accum=2, max_grad_norm=None), tmp_path,
                   progress=False)
    record = read_metrics(tmp_path)[0]
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert record["tokens"] == 4 * SEQ and record["targets"] == int((targets != -100).sum())
    assert result.steps == 1 and result.loss == record["loss"]


def test_boolean_logits_at_gives_the_selected_positions_only():
    """The loss's output layer runs only where a target is: Transformer(logits_at=bool [B,T]) is the full logits at
    the True positions, row-major, with the gradient flowing to the blocks as through the full logits."""
    model = tiny_model()
    batch = toy_batch(3, 2)
    wanted = batch.targets != -100
    assert 0 < int(wanted.sum()) < wanted.numel()
    picked = model(batch.tokens, logits_at=wanted)
    full = model(batch.tokens)
    assert picked.shape == (int(wanted.sum()), VOCAB)
    torch.testing.assert_close(picked, full[wanted], rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(F.cross_entropy(picked, batch.targets[wanted], reduction="sum"), model.layers[0].attention.wo.weight)
    ce = F.cross_entropy(full.flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction="sum")
    (g2,) = torch.autograd.grad(ce, model.layers[0].attention.wo.weight)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_only_trainable_parameters_change_and_are_checkpointed(tmp_path):
    model = tiny_model(lora=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    saved = []
    train(model, ToyBatches(rows=2), cfg_for(steps=2), tmp_path, progress=False,
          on_save=lambda step, out, state: saved.append((step, sorted(state))))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())
    assert all(not torch.equal(params[n], t) for n, t in adapters.items())
    assert saved == [(2, sorted(adapters))]
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(tmp_path / "checkpoint")).read_metadata().state_dict_metadata
    assert {k.removeprefix("model.") for k in stored if k.startswith("model.")} == set(adapters)


def test_trainable_argument_freezes_the_rest(tmp_path):
    model = tiny_model()
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, ToyBatches(rows=2), cfg_for(steps=1), tmp_path, trainable=norms, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.endswith("norm.weight")}


def test_metrics_lines_and_validation_loss(tmp_path):
    model = tiny_model()
    val = [toy_batch(1000 + i, 3) for i in range(2)]
    train(model, ToyBatches(rows=2, per_epoch=2), cfg_for(steps=None, epochs=2.0, eval_every=2), tmp_path,
          val_batches=lambda: iter(val), progress=False)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # 2 epochs of 2 micro-batches
    for r in records:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "epoch", "elapsed_s"} <= set(r)
    assert [r["tokens"] for r in records] == [2 * SEQ * s for s in (1, 2, 3, 4)]
    assert [("val_loss" in r) for r in records] == [False, True, False, True]
    # the last validation loss is the final model's mean cross-entropy over the validation targets
    tokens, targets = torch.cat([b.tokens for b in val]), torch.cat([b.targets for b in val])
    with torch.no_grad():
        expected = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100).item()
    assert records[-1]["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_activation_checkpointing_changes_nothing(tmp_path):
    runs = []
    for ac in (False, True):
        model = tiny_model(lora=True)
        train(model, ToyBatches(rows=2), cfg_for(steps=3, activation_checkpointing=ac), tmp_path / str(ac),
              progress=False)
        runs.append([r[k] for r in read_metrics(tmp_path / str(ac)) for k in ("loss", "grad_norm")])
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_compiled_blocks_train_as_the_eager_ones(tmp_path):
    """TrainConfig(compile=True) (finetune/pretrain --compile): each block torch.compile'd, the same losses and
    gradient norms as eager (Inductor fuses and reorders float32 arithmetic: a small tolerance), LoRA'd blocks
    and a tied output included; the blocks really run compiled."""
    runs = []
    for compiled in (False, True):
        model = tiny_model(lora=True, tied=True)
        train(model, ToyBatches(rows=2), cfg_for(steps=3, compile=compiled), tmp_path / str(compiled), progress=False)
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers) == compiled
        runs.append([r[k] for r in read_metrics(tmp_path / str(compiled)) for k in ("loss", "grad_norm")])
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


def test_compile_without_a_cpp_compiler_is_one_clear_error(tmp_path, monkeypatch):
    from torch._inductor import cpp_builder

    def missing():
        raise RuntimeError("Unsupported: no C++ compiler found\nlong details")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(TrainError, match=r"--compile needs a C\+\+ compiler .*no C\+\+ compiler found\): install g\+\+"):
        train(tiny_model(), ToyBatches(rows=2), cfg_for(steps=1, compile=True), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint").exists()


def test_precision_auto_follows_the_cpu_and_bf16_trains(tmp_path):
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    losses = {}
    for precision in ("fp32", "bf16"):
        train(tiny_model(), ToyBatches(rows=2), cfg_for(steps=2, precision=precision), tmp_path / precision,
              progress=False)
        losses[precision] = [r["loss"] for r in read_metrics(tmp_path / precision)]
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bfloat16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_refuses_to_overwrite_or_to_resume_nothing(tmp_path):
    with pytest.raises(TrainError, match="no checkpoint"):
        train(tiny_model(), ToyBatches(rows=2), cfg_for(steps=1), tmp_path, resume=True, progress=False)
    train(tiny_model(), ToyBatches(rows=2), cfg_for(steps=1), tmp_path, progress=False)
    with pytest.raises(TrainError, match="already holds a checkpoint"):
        train(tiny_model(), ToyBatches(rows=2), cfg_for(steps=1), tmp_path, progress=False)


def test_resuming_with_other_trainable_parameters_is_one_clear_error(tmp_path):
    train(tiny_model(lora=True), ToyBatches(rows=2), cfg_for(steps=1), tmp_path, progress=False)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not fit") as info:
        train(tiny_model(), ToyBatches(rows=2), cfg_for(steps=2), tmp_path, resume=True, progress=False)
    assert "\n" not in str(info.value)


def test_diverged_loss_is_an_error(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    with pytest.raises(TrainError, match="loss is nan at step 1"):
        train(model, ToyBatches(rows=2), cfg_for(steps=1), tmp_path, progress=False)


def test_progress_shows_status_and_eta_and_logs_every_n_steps(monkeypatch):
    import io

    from camelid import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    bar = progress.Progress(10, "train", unit="step", stream=stream, initial=4, every=2)
    now[0] = 1.0
    bar.update(1, status="loss 2.5")  # step 5: not a multiple of 2, no line
    now[0] = 2.0
    bar.update(1, status="loss 2.0")  # step 6: 2 steps in 2 s: 4 left, ETA 0:04
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "train:  60.0% 6 step / 10 step (1.00 step/s) loss 2.0 ETA 0:04"
    assert lines[1].startswith("train:  60.0%") and len(lines) == 2
    assert progress._clock(3725) == "1:02:05"


# --- checkpoints ---------------------------------------------------------------------------------------------


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model(lora=True)
    train(model, ToyBatches(rows=2), cfg_for(steps=2, save_every=1), tmp_path, progress=False)
    at_step2 = _trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ctx = checkpoint.DistContext()

    def torn_write(state, path):  # write half the file, then die
        Path(path).write_bytes(b"\x80\x02 half a pickle")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_trainer", torn_write)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, model, optimizer, {"step": 3}, ctx)
    monkeypatch.undo()
    assert (tmp_path / checkpoint.TMP).exists() and checkpoint.find(tmp_path) == tmp_path / "checkpoint"
    fresh = tiny_model(lora=True)
    state = checkpoint.load(checkpoint.find(tmp_path), fresh, torch.optim.AdamW(
        [p for p in fresh.parameters() if p.requires_grad]), ctx)
    assert state["step"] == 2 and state["data"] == {"pos": 2}
    assert all(torch.equal(t, at_step2[n]) for n, t in _trainable(fresh).items())

    # a crash between the two renames (old moved aside, new not yet in place): the old one is found
    real_rename, calls = os.rename, []

    def rename_then_die(src, dst):
        if Path(dst).name in ("checkpoint", checkpoint.OLD):  # the swap's renames (DCP renames files of its own)
            calls.append(dst)
            if len(calls) == 2:
                raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename_then_die)
    with pytest.raises(OSError, match="power cut"):
        checkpoint.save(tmp_path, model, optimizer, {"step": 3}, ctx)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint").exists() and checkpoint.find(tmp_path) == tmp_path / checkpoint.OLD
    assert torch.load(checkpoint.find(tmp_path) / checkpoint.TRAINER, weights_only=True)["step"] == 2
    # and the next save completes the swap
    checkpoint.save(tmp_path, model, optimizer, {"step": 3}, ctx)
    assert checkpoint.find(tmp_path) == tmp_path / "checkpoint" and not (tmp_path / checkpoint.OLD).exists()


def run_script(*args: str, torchrun: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """Run this file as a training script (under torchrun with `torchrun` processes)."""
    import conftest

    return conftest.run_script(HERE, *args, torchrun=torchrun, check=check, timeout=300)


@pytest.mark.parametrize("kill, logged", [(("--kill-at", "4"), 4),
                                          pytest.param(("--kill-in-step", "6"), 5, marks=pytest.mark.slow)],
                         ids=["after-checkpoint", "between-checkpoints"])
def test_sigkill_then_resume_logs_the_same_losses(tmp_path, kill, logged):
    """Killed right after step 4's checkpoint, or during step 6 (its metrics line unwritten; step 5's line,
    after the checkpoint, is dropped on resume). Dropout in the adapters makes the losses depend on the
    restored RNG state too."""
    common = ["--steps", "7", "--save-every", "2", "--mode", "lora", "--dropout", "0.2", "--grad-accum", "2"]
    run_script("--out", str(tmp_path / "whole"), *common)
    killed = run_script("--out", str(tmp_path / "cut"), *common, *kill, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, logged + 1))
    run_script("--out", str(tmp_path / "cut"), *common, "--resume")
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "targets", "epoch")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in whole]


# --- full fine-tuning from a memory-mapped GGUF ----------------------------------------------------------------


def test_full_finetune_of_a_gguf_f32_model(tmp_path):
    from gguf_factory import Spec, byte_level_vocab, write_gguf

    import camelid

    path = tmp_path / "tiny.gguf"
    write_gguf(path, Spec(tied=True), byte_level_vocab())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = camelid.load(path, quant=None).model
    model.requires_grad_(True)  # without the copy: a clear error, not a crash at the first optimizer write
    with pytest.raises(TrainError, match="read-only memory-mapped"):
        train(model, ToyBatches(rows=2), cfg_for(steps=1), tmp_path / "no-copy", progress=False)
    weight = model.layers[0].attention.wq.weight
    before = weight.data_ptr()
    params = make_trainable_copy(model)
    assert weight.data_ptr() != before  # owned memory now, not the file's map
    assert model.output.weight is model.tok_embeddings.weight  # still tied
    assert len(params) == len(list(model.parameters()))
    global VOCAB
    saved, VOCAB = VOCAB, model.config.vocab_size
    try:
        result = train(model, ToyBatches(rows=2), cfg_for(steps=3, lr=3e-3), tmp_path / "out", progress=False)
    finally:
        VOCAB = saved
    losses = [r["loss"] for r in read_metrics(tmp_path / "out")]
    assert result.steps == 3 and all(math.isfinite(x) for x in losses)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the file was never written


# --- the script the subprocess tests run ---------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--kill-at", type=int, default=0, help="SIGKILL right after this step's checkpoint")
    ap.add_argument("--kill-in-step", type=int, default=0, help="SIGKILL before this step's metrics line")
    ap.add_argument("--mode", choices=("full", "lora"), default="full")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-by-rank", action="store_true", help="each process initializes differently (a bug)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from camelid.train.distributed import setup

    ctx = setup()
    model = tiny_model(seed=ctx.rank if a.init_by_rank else 0, lora=a.mode == "lora", dropout=a.dropout,
                       tied=a.mode == "full")
    batches = ToyBatches(rows=a.rows, rank=ctx.rank, world=ctx.world)
    val = [toy_batch(1000 + ctx.world * i + ctx.rank, a.rows) for i in range(2 // ctx.world)]  # this process's shard

    def on_save(step: int, out: Path, state: dict) -> None:
        torch.save(state, out / "trainable.pt")
        if step == a.kill_at:
            os.kill(os.getpid(), 9)

    cfg = cfg_for(steps=a.steps, save_every=a.save_every, grad_accum=a.grad_accum, eval_every=a.eval_every,
                  lr=3e-3, warmup_steps=2)
    def on_log(record: dict) -> None:
        if record["step"] == a.kill_in_step:
            os.kill(os.getpid(), 9)

    train(model, batches, cfg, a.out, val_batches=val if a.eval_every else None, on_save=on_save, on_log=on_log,
          resume=a.resume, progress=False)


if __name__ == "__main__":
    main()

