"""Two processes under torchrun (FSDP2 on gloo) against one process with the same global batch.

One process takes each optimizer step as 2 micro-batches (grad_accum=2); two processes take one micro-batch
each. With the loss divided by the step's total target count over all processes, both must log the same
losses, gradient norms and validation losses. The gradient norm is the sharp check on gloo's reduction:
AdamW is nearly invariant to a gradient scale, so summed gradients (pytorch#162338) would hardly move the
losses, but they would double the norm.
"""

from __future__ import annotations

import pytest
import torch
from test_train_loop import read_metrics, run_script

pytestmark = pytest.mark.slow
KEYS = ("loss", "grad_norm", "lr", "tokens", "targets", "epoch", "val_loss")


def _same(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in KEYS:
            assert (key in a) == (key in b), (key, a, b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a["step"], a[key], b[key])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_processes_give_the_losses_of_one(tmp_path, mode):
    """lora: a frozen base linear with a trainable low-rank add-on inside each FSDP2 unit; full: every weight
    (tied output and embedding included) trainable."""
    common = ["--steps", "4", "--mode", mode, "--eval-every", "2"]
    run_script("--out", str(tmp_path / "one"), *common, "--grad-accum", "2")
    run_script("--out", str(tmp_path / "two"), *common, "--grad-accum", "1", torchrun=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == 4 and sum("val_loss" in r for r in one) == 2
    assert one[-1]["loss"] != one[0]["loss"]
    _same(one, two)
    # on_save got the whole trainable parameters on rank 0, gathered from both processes' shards
    saved = [torch.load(tmp_path / run / "trainable.pt", weights_only=True) for run in ("one", "two")]
    assert sorted(saved[0]) == sorted(saved[1]) and len(saved[0]) == (12 if mode == "lora" else 21)
    for name, t in saved[0].items():
        assert saved[1][name].shape == t.shape
        torch.testing.assert_close(saved[1][name], t, rtol=1e-4, atol=1e-6)


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path):
    """Killed after step 2's checkpoint at 2 processes, resumed at 1: steps 3 and 4 are those of a run that
    was one process throughout (DCP reshards the parameters and AdamW state; the data position is global)."""
    common = ["--steps", "4", "--mode", "lora", "--save-every", "2"]
    run_script("--out", str(tmp_path / "one"), *common, "--grad-accum", "2")
    killed = run_script("--out", str(tmp_path / "moved"), *common, "--kill-at", "2", torchrun=2, check=False)
    assert killed.returncode != 0
    assert [r["step"] for r in read_metrics(tmp_path / "moved")] == [1, 2]
    run_script("--out", str(tmp_path / "moved"), *common, "--grad-accum", "2", "--resume")
    _same(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "moved"))


def test_processes_with_different_initial_weights_are_refused(tmp_path):
    proc = run_script("--out", str(tmp_path / "bad"), "--steps", "1", "--init-by-rank", torchrun=2, check=False)
    assert proc.returncode != 0 and "different initial weights" in proc.stdout + proc.stderr
