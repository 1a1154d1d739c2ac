"""`camelid finetune` end to end on tiny random GGUF models: what it writes, that training moves the model, the
three methods on both paths, and one-line errors. The parts have their own tests (test_train_data.py,
test_lora.py, test_train_loop.py, test_export.py); this checks that the command wires them together."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import camelid_cli as run
from conftest import one_line_error, run_torchrun
from gguf import GGMLQuantizationType as GQ
from gguf_factory import Spec, byte_level_vocab, write_gguf

import camelid
from camelid.cli import main
from camelid.formats.peft import read_adapter

SPEC = Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, context_length=256)
RECORDS = [{"messages": [{"role": "user", "content": f"What is the code word number {i}?"},
                         {"role": "assistant", "content": f"The code word {i} is heron{i}."}]} for i in range(6)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    paths = {}
    for name, qtype in (("f32", GQ.F32), ("q4_0", GQ.Q4_0)):
        paths[name] = d / f"tiny-{name}.gguf"
        write_gguf(paths[name], SPEC, byte_level_vocab(), qtype)
    data, val = d / "train.jsonl", d / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    val.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    return paths, data, val


def _finetune(tmp_path, model, data, *flags: str) -> list[dict]:
    out = tmp_path / "out"
    assert main(["finetune", str(model), "--data", str(data), "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _logits(llm, text: str = "What is the code word number 3?") -> torch.Tensor:
    ids = torch.tensor([llm.encode_chat([{"role": "user", "content": text}])])
    with torch.no_grad():
        return llm.model(ids)[0, -1]


def test_lora_writes_a_peft_adapter_metrics_and_a_checkpoint(tmp_path, tiny):
    paths, data, val = tiny
    rows = _finetune(tmp_path, paths["f32"], data, "--val", str(val), "--steps", "12", "--lr", "1e-2", "--seq-len", "128",
                     "--batch-size", "2", "--eval-every", "4", "--seed", "1", "--dropout", "0")
    out = tmp_path / "out"
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(r)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 12]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"] and rows[-1]["val_loss"] < rows[3]["val_loss"]
    assert (out / "checkpoint").is_dir()
    keys = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert keys == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # never lm_head
    adapter = read_adapter(out)
    assert adapter.r == 8 and len(adapter.pairs) == 7 * SPEC.n_layers
    # the adapter changes the model, the base file does not change, and both paths agree on it
    base = camelid.load(paths["f32"], quant=None)
    tuned = camelid.load(paths["f32"], quant=None, adapter=out)
    assert (_logits(tuned) - _logits(base)).abs().max() > 0.1
    assert torch.equal(_logits(camelid.load(paths["f32"], quant=None)), _logits(base))


def test_compiled_lora_trains_as_eager_lora(tmp_path, tiny):
    """--compile (torch.compile per block, over the fused frozen base and the block-diagonal B's): the same losses
    and the same adapter as eager training, within float32 reordering (which Adam's normalized steps amplify in
    the smallest entries)."""
    paths, data, _ = tiny
    flags = ("--steps", "4", "--lr", "1e-2", "--seq-len", "128", "--batch-size", "2", "--dropout", "0",
             "--precision", "fp32")
    eager = _finetune(tmp_path / "eager", paths["f32"], data, *flags)
    compiled = _finetune(tmp_path / "compiled", paths["f32"], data, *flags, "--compile")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    a, b = read_adapter(tmp_path / "eager" / "out"), read_adapter(tmp_path / "compiled" / "out")
    assert a.pairs.keys() == b.pairs.keys()
    for module, (lora_a, lora_b) in a.pairs.items():
        torch.testing.assert_close(b.pairs[module][0], lora_a, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(b.pairs[module][1], lora_b, rtol=1e-3, atol=1e-4)
    assert any(float(lora_b.abs().max()) > 0 for _, lora_b in a.pairs.values())  # training moved B off zero


def test_qlora_keeps_the_base_quantized_and_serves_on_both_paths(tmp_path, tiny):
    paths, data, _ = tiny
    rows = _finetune(tmp_path, paths["q4_0"], data, "--method", "qlora", "--steps", "10", "--lr", "1e-2",
                     "--seq-len", "128", "--batch-size", "2", "--targets", "q,v,down", "--dropout", "0")
    assert rows[-1]["loss"] < rows[0]["loss"]
    out = tmp_path / "out"
    assert read_adapter(out).targets == ("q", "v", "down")
    fast = camelid.load(paths["q4_0"], adapter=out)  # the fast path: Q4_0 kept as stored, the adapter unmerged
    ref = camelid.load(paths["q4_0"], quant=None, adapter=out)
    plain = camelid.load(paths["q4_0"], quant=None)
    shift = (_logits(ref) - _logits(plain)).abs().max()
    assert shift > 0.05
    assert (_logits(fast) - _logits(ref)).abs().max() < 0.2 * shift + 0.05  # bf16 products on the fast path


def test_full_finetune_writes_a_model_folder(tmp_path, tiny):
    paths, data, _ = tiny
    rows = _finetune(tmp_path, paths["f32"], data, "--method", "full", "--steps", "6", "--lr", "1e-3", "--seq-len", "128",
                     "--batch-size", "2")
    out = tmp_path / "out"
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    tuned, base = camelid.load(out, quant=None), camelid.load(paths["f32"], quant=None)
    assert (_logits(tuned) - _logits(base)).abs().max() > 1e-3
    assert tuned.encode_chat(RECORDS[0]["messages"]) == base.encode_chat(RECORDS[0]["messages"])  # same tokenizer


def test_mistakes_are_one_line(tmp_path, tiny):
    paths, data, _ = tiny
    model = str(paths["f32"])
    assert "no such data file" in one_line_error(run("finetune", model, "--data", str(tmp_path / "nope.jsonl"),
                                                         "--out", str(tmp_path / "o")))
    assert "unknown LoRA target 'lm_head'" in one_line_error(run("finetune", model, "--data", str(data), "--out",
                                                                     str(tmp_path / "o"), "--targets", "q,lm_head"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + '{"messages": [{"role": "wizard", "content": "x"}]}\n')
    line = one_line_error(run("finetune", model, "--data", str(bad), "--out", str(tmp_path / "o")))
    assert f"{bad}:2" in line
    assert "--resume" in one_line_error(run("finetune", model, "--data", str(data), "--out", str(tmp_path / "o"),
                                               "--resume"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert "not empty" in one_line_error(run("finetune", model, "--data", str(data), "--out", str(full)))
    assert "not both" in one_line_error(run("finetune", model, "--data", str(data), "--out", str(tmp_path / "o"),
                                               "--steps", "2", "--epochs", "1"))


@pytest.mark.slow
def test_two_processes_under_torchrun_give_the_losses_of_one(tmp_path, tiny):
    """`torchrun --nproc-per-node 2 -m camelid finetune` (FSDP2 on gloo, batch 1 per process) against one process
    with batch 2: the same global batch, so the same losses (small tolerance: the sums are reduced differently)."""
    paths, data, _ = tiny
    flags = ["--data", str(data), "--steps", "4", "--seq-len", "128", "--dropout", "0", "--lr", "1e-2"]
    one = tmp_path / "one"
    assert main(["finetune", str(paths["f32"]), "--out", str(one), "--batch-size", "2", *flags]) == 0
    two = tmp_path / "two"
    r = run_torchrun(["-m", "camelid", "finetune", str(paths["f32"]), "--out", str(two), "--batch-size", "1", *flags], 2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=2e-3)
    assert read_adapter(two).pairs.keys() == read_adapter(one).pairs.keys()
