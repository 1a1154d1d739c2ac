"""Training from scratch: tokenizer training, data preparation, `camelid pretrain`, its output folder as a model.

Independent checks: transformers reads the tokenizer and the model folder (same ids, same logits as camelid),
llama.cpp reads the exported GGUF, a re-tokenization of the corpus matches the shards, an uninterrupted run is the
reference of a killed-and-resumed one, and one process with the global batch the reference of two.
Run as a script (`python tests/test_pretrain.py ARGS`), this file is `camelid pretrain` with an optional SIGKILL
at a given step (before that step's metrics line), for the subprocess tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
WORDS = ("the a llama camel walks runs over under hill river village market wool soft warm cold morning night sings "
         "carries water bread green stone road far near small large old young herd farmer child sleeps eats").split()
CONFIG = {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 64, "max_seq_len": 64,
          "tie_embeddings": True}


def _text(rng: np.random.Generator, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(4, 12))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (root / "docs").mkdir()
    for i in range(6):
        (root / "docs" / f"story{i}.txt").write_text(_text(rng, 60), encoding="utf-8")
    (root / "docs" / "notes.md").write_text("# Notes\n\n" + _text(rng, 40), encoding="utf-8")
    lines = [json.dumps({"text": _text(rng, 8)}) for _ in range(10)]
    (root / "docs" / "web.jsonl").write_text("\n".join(lines[:5] + ["{not json", '{"title": "no text"}'] + lines[5:])
                                             + "\n", encoding="utf-8")
    (root / "docs" / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    (root / "docs" / "binary.txt").write_bytes(bytes(range(256)) * 4)
    return root / "docs"


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    from camelid.train.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([corpus], 300, out, progress=False)
    return out


@pytest.fixture(scope="module")
def data_dir(corpus, tok_dir, tmp_path_factory) -> Path:
    from camelid.train.shards import prepare

    out = tmp_path_factory.mktemp("data") / "data"
    prepare([corpus], tok_dir, out, block_tokens=512, progress=False)
    return out


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "micro.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def trained(data_dir, config_file, tmp_path_factory) -> Path:
    """A micro model trained for 6 steps through the CLI."""
    from conftest import camelid_cli

    out = tmp_path_factory.mktemp("run") / "model"
    r = camelid_cli("pretrain", "--config", str(config_file), "--data", str(data_dir), "--out", str(out), "--steps", "6",
                    "--seq-len", "32", "--batch-size", "4", "--save-every", "3", "--eval-every", "3", "--eval-batches", "2",
                    "--sample-tokens", "8", "--lr", "3e-3", "--peak-flops", "1e11")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr and "warning" not in r.stderr.lower(), r.stderr[-4000:]
    return out


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --- tokenizer -------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_transformers_reads_it_alike(tok_dir):
    from transformers import AutoTokenizer

    from camelid.chat import encode_chat
    from camelid.train.tokenizer_train import SPECIALS, load_tokenizer

    tok = load_tokenizer(tok_dir)
    assert tok.vocab_size == 300
    assert [tok.backend.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    assert tok.bos_id == 0 and tok.eos_id == 1 and tok.backend.token_to_id("<|im_end|>") in tok.stop_ids
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    for text in ("The llama walks over the hill.", "Ünïcödé ✓ and 数字 12345, never seen!", "  two  spaces\n\ttab"):
        ids = tok.encode(text, bos=True)
        assert ids[0] == tok.bos_id and tok.decode(ids) == text  # byte-level: everything round-trips
        assert hf(text).input_ids == ids
    messages = [{"role": "user", "content": "Hi llama"}, {"role": "assistant", "content": "Hello."}]
    assert encode_chat(tok, messages[:1]) == hf.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False)
    assert tok.decode(encode_chat(tok, messages[:1]), special=True) == \
        "<|begin_of_text|><|im_start|>user\nHi llama<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_train_cli_errors_and_bad_files(corpus, tmp_path):
    from conftest import camelid_cli, one_line_error

    assert "at least 261" in one_line_error(camelid_cli("tokenizer", "train", str(corpus), "--vocab-size", "100",
                                                        "--out", str(tmp_path / "t")))
    assert "no such file" in one_line_error(camelid_cli("tokenizer", "train", str(tmp_path / "nope"), "--vocab-size",
                                                        "300", "--out", str(tmp_path / "t")))
    r = camelid_cli("tokenizer", "--bogus")
    assert r.returncode == 2 and r.stderr.startswith("camelid: error:")
    r = camelid_cli("tokenizer", "train", str(corpus), "--out", str(tmp_path / "t2"), "--vocab-size", "280")
    assert r.returncode == 0, r.stderr
    assert "2 bad files, 2 bad records" in r.stdout
    for name in ("latin1.txt: not UTF-8", "binary.txt: a binary file", "web.jsonl:6: not valid JSON",
                 "web.jsonl:7: no non-empty string 'text'"):
        assert name in r.stderr
    assert json.loads((tmp_path / "t2" / "tokenizer_config.json").read_text())["chat_template"]


# --- prepare ---------------------------------------------------------------------------------------------------


def test_prepare_shards_hold_the_corpus_tokens(corpus, tok_dir, data_dir):
    from camelid.train.corpus import Corpus
    from camelid.train.shards import TokenStream, read_meta, token_dtype
    from camelid.train.tokenizer_train import load_tokenizer

    meta = read_meta(data_dir)
    assert meta["dtype"] == "uint16" and token_dtype(70000) == np.uint32
    assert meta["bad_files"] == 2 and meta["bad_records"] == 2 and meta["documents"] == 7 + 10
    tok = load_tokenizer(tok_dir)
    stream = []
    for doc in Corpus([corpus]).documents():  # an independent re-tokenization, whole documents at once
        stream += [tok.bos_id, *tok.encode("".join(doc.pieces)), tok.eos_id]
    train, val = TokenStream(data_dir, "train"), TokenStream(data_dir, "val")
    assert train.n + val.n == len(stream) == meta["tokens"]["train"] + meta["tokens"]["val"]
    assert val.n > 0 and train.slice(0, 512).tolist() == stream[:512]  # block 1 goes to training
    period = round(1 / meta["val_frac"])
    assert val.slice(0, 512).tolist() == stream[512 * (period - 1): 512 * period]  # every 20th block validates


def test_prepare_errors_are_one_line(corpus, tok_dir, data_dir, tmp_path):
    from conftest import camelid_cli, one_line_error

    assert "already holds prepared data" in one_line_error(
        camelid_cli("prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(data_dir)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.txt").write_bytes(b"\0\1\2" * 10)
    assert "no usable text" in one_line_error(camelid_cli("prepare", str(bad), "--tokenizer", str(tok_dir), "--out",
                                                          str(tmp_path / "o")))
    assert not (tmp_path / "o" / "train-00000.bin").exists()
    assert "no meta.json" in one_line_error(camelid_cli("pretrain", "--preset", "tiny", "--data", str(bad), "--out",
                                                        str(tmp_path / "m")))


# --- the data stream -------------------------------------------------------------------------------------------


def test_two_ranks_take_one_process_batches_and_positions_reshard(data_dir):
    from camelid.train.shards import TokenBatches

    opts = dict(seq_len=16, batch_size=3, seed=5)
    one = TokenBatches(data_dir, **opts)
    it = iter(one)
    ref = [next(it) for _ in range(8)]
    ranks = [TokenBatches(data_dir, **opts, rank=r, world=2) for r in range(2)]
    its = [iter(b) for b in ranks]
    for k in range(2):  # rank r's k-th micro-batch is global micro-batch 2k + r
        for r in range(2):
            assert torch.equal(next(its[r]).tokens, ref[2 * k + r].tokens)
    b = ref[0]
    assert torch.equal(b.targets[:, :-1], b.tokens[:, 1:]) and b.segments is None and b.n_targets == 3 * 16
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert state["micro"] == 4
    resumed = TokenBatches(data_dir, **opts)  # a 2-process position, resumed in one process
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for i in range(4):
        assert torch.equal(next(it2).tokens, ref[4 + i].tokens)


def test_finetune_batches_resume_on_another_process_count():
    from camelid.train.data import Batches, Sample

    samples = [Sample(list(range(1, 3 + i % 5)), [False] + [True] * (1 + i % 5), f"f:{i}") for i in range(40)]
    opts = dict(seq_len=8, batch_size=2, seed=3)
    one = iter(Batches(samples, **opts))
    ref = [next(one) for _ in range(6)]
    two = Batches(samples, **opts, rank=1, world=2)
    it = iter(two)
    assert torch.equal(next(it).tokens, ref[1].tokens)
    state = two.state_dict()
    assert state["micro"] == 2 and "world" not in state["data"]
    back = Batches(samples, **opts)
    back.load_state_dict(state)
    rest = iter(back)
    assert [torch.equal(next(rest).tokens, ref[k].tokens) for k in (2, 3)] == [True, True]
    three = Batches(samples, **opts, world=3)
    with pytest.raises(ValueError, match="cannot share evenly"):
        three.load_state_dict(state)


# --- pretrain and its output folder ----------------------------------------------------------------------------


def test_pretrain_writes_metrics_curve_samples_and_a_model(trained):
    from camelid.train.flops import flops_per_token

    metrics = read_metrics(trained)
    assert [r["step"] for r in metrics] == list(range(1, 7))
    for r in metrics:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu"} <= set(r)
        assert r["tokens"] == r["step"] * 4 * 32
        fpt = flops_per_token(__import__("camelid.config", fromlist=["x"]).ModelConfig.from_dict({**CONFIG, "vocab_size": 300}), 32)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e11)
    assert sum("val_loss" in r for r in metrics) == 2
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    png = (trained / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and int.from_bytes(png[16:20], "big") == 640
    samples = [json.loads(line) for line in (trained / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [3, 6] and all(s["text"].startswith("The") for s in samples)
    record = json.loads((trained / "pretrain.json").read_text())
    assert record["model"]["vocab_size"] == 300 and record["flop_formula"].startswith("6 * matmul_params")


def test_output_folder_loads_in_transformers_with_the_same_logits(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import camelid

    hf = AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(trained))
    ids = tok("The llama walks over the hill", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(ids).logits
    llm = camelid.load(str(trained), quant=None)
    ours = llm.model(ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_camelid_commands_take_the_output_folder(trained, tmp_path):
    from conftest import camelid_cli

    r = camelid_cli("run", str(trained), "The llama", "--max-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    text = tmp_path / "t.txt"
    text.write_text(_text(np.random.default_rng(9), 20))
    r = camelid_cli("perplexity", str(trained), str(text), "--json")
    assert r.returncode == 0, r.stderr
    assert 1 < json.loads(r.stdout)["perplexity"] < 300


def test_export_gguf_loads_in_llama_cpp(trained, tmp_path):
    from conftest import camelid_cli, require_llama_cpp

    out = tmp_path / "m.gguf"
    r = camelid_cli("export", str(trained), "--to", "gguf", "--type", "f32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    hf = tmp_path / "hf"
    r = camelid_cli("export", str(trained), "--to", "hf", "--out", str(hf))
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(hf)).config.vocab_size == 300
    import camelid

    llm = camelid.load(str(trained), quant=None)
    ids = llm.tokenizer.encode("The llama walks over the hill", bos=True)
    ours = llm.model(torch.tensor([ids]))[0]
    back = camelid.load(str(out), quant=None)  # camelid's GGUF reader: the same tokens and logits
    assert back.tokenizer.encode("The llama walks over the hill", bos=True) == ids
    torch.testing.assert_close(back.model(torch.tensor([ids]))[0], ours, rtol=1e-5, atol=1e-5)
    llama_cpp = require_llama_cpp()
    peer = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False)
    assert peer.tokenize(b"The llama walks over the hill") == ids
    peer.eval(ids)
    theirs = torch.tensor(np.array(peer.scores[: len(ids)]))
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_init_continues_pretraining_an_existing_model(trained, data_dir, tmp_path):
    """--init starts from the model's weights (the first loss is the trained model's, not a fresh one's)."""
    from conftest import camelid_cli, one_line_error

    out = tmp_path / "more"
    r = camelid_cli("pretrain", "--init", str(trained), "--data", str(data_dir), "--out", str(out), "--steps", "2",
                    "--seq-len", "32", "--batch-size", "4", "--eval-batches", "0", "--sample-tokens", "0", "--peak-flops", "1e11")
    assert r.returncode == 0, r.stderr[-3000:]
    first = read_metrics(trained)[0]["loss"]
    assert read_metrics(out)[0]["loss"] < first - 0.05
    assert json.loads((out / "config.json").read_text())["hidden_size"] == CONFIG["dim"]
    line = one_line_error(camelid_cli("pretrain", "--init", str(trained), "--preset", "tiny", "--data", str(data_dir),
                                      "--out", str(tmp_path / "x")))
    assert "give no --preset" in line


# --- fault tolerance and processes -----------------------------------------------------------------------------


def run_script(*args: str, torchrun: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """`camelid pretrain ARGS` through this file (under torchrun with `torchrun` processes)."""
    import conftest

    return conftest.run_script(HERE, *args, torchrun=torchrun, check=check)


def _common(data_dir: Path, config_file: Path, steps: int = 6) -> list[str]:
    return ["--config", str(config_file), "--data", str(data_dir), "--steps", str(steps), "--seq-len", "32",
            "--batch-size", "2", "--save-every", "2", "--eval-every", "2", "--eval-batches", "2", "--sample-tokens", "0",
            "--precision", "fp32", "--peak-flops", "1e11", "--lr", "3e-3"]


KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "epoch", "val_loss")


def _same(one: list[dict], two: list[dict], exact: bool = True) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in KEYS:
            assert (key in a) == (key in b), (key, a, b)
            if key in a:
                if exact:
                    assert a[key] == b[key], (key, a["step"], a[key], b[key])
                else:
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a["step"], a[key], b[key])


def test_sigkill_mid_run_then_resume_gives_the_same_losses(data_dir, config_file, tmp_path):
    """Killed during step 5 (after step 4's checkpoint; the metrics line of step 5 unwritten), then --resume:
    steps 5 and 6 are those of the uninterrupted run, bit for bit (data position, RNG, AdamW state restored)."""
    common = _common(data_dir, config_file)
    run_script("--out", str(tmp_path / "whole"), *common)
    killed = run_script("--out", str(tmp_path / "cut"), *common, "--kill-in-step", "5", check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    run_script("--out", str(tmp_path / "cut"), *common, "--resume")
    _same(read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut"))
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "cut" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(data_dir, config_file, tmp_path):
    """2 processes (FSDP2 on gloo) with batch 2 each vs 1 process with batch 2 and grad_accum 2: the same losses,
    gradient norms (summed rather than averaged gradients, pytorch#162338, would double them) and validation
    losses. Then a 2-process run killed during step 3 resumes in 1 process with the losses of the 1-process run."""
    common = _common(data_dir, config_file, steps=4)
    run_script("--out", str(tmp_path / "one"), *common, "--grad-accum", "2")
    run_script("--out", str(tmp_path / "two"), *common, torchrun=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert one[-1]["loss"] < one[0]["loss"]
    _same(one, two, exact=False)
    killed = run_script("--out", str(tmp_path / "moved"), *common, "--kill-in-step", "3", torchrun=2, check=False)
    assert killed.returncode != 0
    assert [r["step"] for r in read_metrics(tmp_path / "moved")] == [1, 2]
    run_script("--out", str(tmp_path / "moved"), *common, "--grad-accum", "2", "--resume")
    _same(one, read_metrics(tmp_path / "moved"), exact=False)


# --- the script the subprocess tests run -----------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    """`camelid pretrain ARGV`; --kill-in-step K: SIGKILL this process during step K (before its metrics line)."""
    import signal

    from camelid.cli import main
    from camelid.train import loop

    kill = 0
    if "--kill-in-step" in argv:
        i = argv.index("--kill-in-step")
        kill = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    train = loop.train

    def killing_train(*args, on_log=None, **kwargs):
        def hook(record):
            if record["step"] == kill:
                os.kill(os.getpid(), signal.SIGKILL)
            if on_log is not None:
                on_log(record)
        return train(*args, on_log=hook, **kwargs)

    if kill:
        loop.train = killing_train
    return main(["pretrain", *argv])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
