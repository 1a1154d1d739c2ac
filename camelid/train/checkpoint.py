"""Training checkpoints: OUT/checkpoint/, written atomically, resumable exactly and on another process count.

A checkpoint folder holds
- the trainable parameters and the optimizer state, through torch.distributed.checkpoint (DCP: every process
  writes its shards, and a checkpoint made by N processes loads in M, one included);
- trainer.pt (written last, by rank 0): step, token counts, elapsed time, the data position (the Batches
  state_dict, which must be a GLOBAL quantity: per-rank state does not reshard), every process's RNG states
  (torch, CUDA, Python, NumPy) and the config;
- config.json, the TrainConfig for people to read.

Atomicity: everything is written into OUT/checkpoint.tmp and fsynced; then the old OUT/checkpoint is renamed
to checkpoint.old, checkpoint.tmp to checkpoint, and checkpoint.old removed. A crash at any point leaves a
complete checkpoint: `find()` takes checkpoint when complete (trainer.pt present), else checkpoint.old.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CamelidError
from .distributed import DistContext, barrier, gather_objects


class CheckpointMismatchError(CamelidError, ValueError):
    """A checkpoint whose tensors do not fit the model (another model, other trainable parameters)."""


CHECKPOINT, TMP, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
TRAINER = "trainer.pt"  # written last: its presence marks a complete checkpoint
VERSION = 1


def find(out_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint in `out_dir` (checkpoint, else checkpoint.old after a crash mid-swap), or None."""
    for name in (CHECKPOINT, OLD):
        path = Path(out_dir) / name
        if (path / TRAINER).is_file():
            return path
    return None


def rng_state() -> dict:
    """This process's RNG states: torch (CPU and CUDA, dropout's included), Python and NumPy."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (every device), Python and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optim": optim_state}


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def _write_trainer(state: dict, path: Path) -> None:
    torch.save(state, path)


def save(out_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict,
         ctx: DistContext, config: dict | None = None) -> Path:
    """Write OUT/checkpoint atomically from every process (a collective under torchrun); returns its path.

    trainer: rank 0's non-tensor state (step, counts, data position); every process's RNG state is added here.
    """
    out = Path(out_dir)
    tmp, final, old = out / TMP, out / CHECKPOINT, out / OLD
    if ctx.main:
        if tmp.exists():  # left by a crash mid-write
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(ctx)
    with warnings.catch_warnings():  # DCP in one process warns that it assumes one process: that is the intent
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        _dcp().save(_tensor_state(model, optimizer), checkpoint_id=str(tmp))
    rngs = gather_objects(rng_state(), ctx)
    barrier(ctx)
    if ctx.main:
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_trainer({"version": VERSION, "world": ctx.world, **trainer, "rng": rngs, "config": config}, tmp / TRAINER)
        _fsync_tree(tmp)
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(out)
        if old.exists():
            shutil.rmtree(old)
    barrier(ctx)
    return final


def load(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict:
    """Restore the trainable parameters and the optimizer state from `path` (from every process; the process
    count may differ from the saving run's) and this process's RNG state; returns the trainer dict.

    When the process count differs, RNG states cannot carry over: each process is re-seeded from the config's
    seed, its rank and the step (data order is unaffected: it lives in the data position).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    trainer = torch.load(path / TRAINER, weights_only=True)
    if trainer.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {trainer.get('version')!r}, expected {VERSION}")
    state = _tensor_state(model, optimizer)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
            _dcp().load(state, checkpoint_id=str(path))
    except (Exception, _dcp().CheckpointException) as e:  # DCP's message holds a traceback per rank: the gist
        text = str(e)
        found = re.search(r"(Missing key in checkpoint state_dict: [\w.]+|Size mismatch[^\n]*)", text)
        gist = found.group(1) if found else (text.splitlines() or [type(e).__name__])[0]
        raise CheckpointMismatchError(f"{path}: the checkpoint does not fit this model's trainable parameters "
                                      f"({gist[:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if trainer["world"] == ctx.world:
        set_rng_state(trainer["rng"][ctx.rank])
    else:
        seed = (trainer.get("config") or {}).get("seed", 0)
        seed_everything(seed + ctx.rank + 1_000_003 * int(trainer["step"]))
    return trainer
