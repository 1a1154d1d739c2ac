"""camelid's lm-evaluation-harness backend and `camelid eval`, against lm-eval's own `hf` backend (transformers) on
the same tokens, a local task end to end, a running server through lm-eval's local-completions, and bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import camelid_cli, one_line_error, running_server
from test_formats_hf import llama_config, random_model, save_folder, train_bpe

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the `eval` extra (in `test` too)")

from lm_eval.api.instance import Instance  # noqa: E402

REQUESTS = [("The capital of France is", " Paris"), ("The capital of France is", " a city in the north"),
            ("1 2 3 4", " 5 6"), ("", "hello world"), ("Question: what colour is the sky?\nAnswer:", " blue")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small random Llama as a Hugging Face folder written by transformers (its tokenizer a BPE with BOS)."""
    tok = train_bpe()
    model = random_model(llama_config(tok.get_vocab_size(), max_position_embeddings=128))
    return save_folder(tmp_path_factory.mktemp("hf") / "tiny", model, tok)


def _instances(pairs, kind="loglikelihood"):
    return [Instance(request_type=kind, doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


@pytest.fixture(scope="module")
def both(folder):
    from lm_eval.models.huggingface import HFLM

    from camelid.eval.harness import CamelidLM

    ours = CamelidLM(str(folder), quant="none", batch_size=3)
    theirs = HFLM(pretrained=str(folder), dtype="float32", batch_size=1, device="cpu")
    return ours, theirs


def test_loglikelihood_matches_transformers(both):
    ours, theirs = both
    a = ours.loglikelihood(_instances(REQUESTS), disable_tqdm=True)
    b = theirs.loglikelihood(_instances(REQUESTS), disable_tqdm=True)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(a, b):
        assert lp == pytest.approx(lp_ref, abs=2e-4)
        assert greedy == greedy_ref
    assert all(lp < 0 for lp, _ in a)


def test_batching_does_not_change_scores(folder, both):
    from camelid.eval.harness import CamelidLM

    ours, _ = both
    one = CamelidLM(llm=ours.llm, batch_size=1)
    a = ours.loglikelihood(_instances(REQUESTS), disable_tqdm=True)
    b = one.loglikelihood(_instances(REQUESTS), disable_tqdm=True)
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-4)


def test_rolling_matches_transformers_across_windows(folder, both):
    from camelid.eval.harness import CamelidLM

    ours, theirs = both
    text = "one two three four five six seven eight nine ten " * 12  # longer than the 64-token window below
    short = CamelidLM(llm=ours.llm, max_length=64)
    assert len(short.tok_encode(text)) > 64
    got = short.loglikelihood_rolling(_instances([(text,)], "loglikelihood_rolling"), disable_tqdm=True)[0]
    theirs._max_length = 64
    try:
        want = theirs.loglikelihood_rolling(_instances([(text,)], "loglikelihood_rolling"), disable_tqdm=True)[0]
    finally:
        theirs._max_length = None
    assert got == pytest.approx(want, rel=1e-4)


def test_generate_until_stops_at_the_stop_string_batched_as_alone(both):
    """Several requests (two option groups, prompts of different lengths) batched give transformers' answers, and
    the same as one at a time."""
    from camelid.eval.harness import CamelidLM

    ours, theirs = both
    reqs = [("1 2 3", {"until": ["\n", "9"], "max_gen_toks": 8, "do_sample": False}),
            ("a b c d e f", {"until": ["\n", "9"], "max_gen_toks": 8, "do_sample": False}),
            ("The sky is", {"until": ["."], "max_gen_toks": 6, "do_sample": False}),
            ("x", {"until": ["\n", "9"], "max_gen_toks": 8, "do_sample": False})]
    got = ours.generate_until(_instances(reqs, "generate_until"), disable_tqdm=True)
    assert got == theirs.generate_until(_instances(reqs, "generate_until"), disable_tqdm=True)
    alone = CamelidLM(llm=ours.llm, batch_size=1).generate_until(_instances(reqs, "generate_until"), disable_tqdm=True)
    assert got == alone and all("9" not in t and "\n" not in t for t in got[:2])


def test_chat_template_hooks(both):
    ours, _ = both
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "Hi" in text and ours.chat_template(True) == ours.llm.chat_template and ours.chat_template(False) is None
    assert ours.tokenizer_name


def _local_task(tmp_path, rows, data="data.jsonl"):
    (tmp_path / "tasks").mkdir(exist_ok=True)
    with open(tmp_path / "tasks" / "data.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    y = tmp_path / "tasks" / "mine.yaml"
    y.write_text(f"""task: my_local_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    return y


ROWS = [{"q": "1 2 3", "choices": [" 4", " x", " 9 9"], "label": 0}, {"q": "a b c", "choices": [" d", " 1"], "label": 0},
        {"q": "The sky is", "choices": [" blue", " green"], "label": 1}]


def test_local_task_end_to_end(tmp_path, folder, both):
    """`camelid eval --tasks FILE.yaml` (data file next to the YAML, run from elsewhere, offline) gives the accuracy
    that transformers' log-likelihoods give on the same prompts."""
    y = _local_task(tmp_path, ROWS)
    r = camelid_cli("eval", str(folder), "--tasks", str(y), "--json", "--out", str(tmp_path / "out.json"), timeout=900)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (row,) = doc["tasks"]
    _, theirs = both
    correct = 0
    for d in ROWS:
        lps = [lp for lp, _ in theirs.loglikelihood(_instances([(d["q"], c) for c in d["choices"]]), disable_tqdm=True)]
        correct += max(range(len(lps)), key=lps.__getitem__) == d["label"]
    assert row["task"] == "my_local_task" and row["n"] == 3
    assert row["scores"][0]["value"] == pytest.approx(correct / 3)
    assert "lm_eval" in json.loads((tmp_path / "out.json").read_text())


def test_compare_prints_one_table(tmp_path, folder):
    """One run (lm-eval's start-up is the cost): the table on stdout and the same scores, with their difference, in --out."""
    y = _local_task(tmp_path, ROWS)
    out = tmp_path / "cmp.json"
    r = camelid_cli("eval", str(folder), "--tasks", str(y), "--compare", "quant=none", "quant=int8", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["tasks"]
    assert len(row["scores"]) == 2 and row["diff"][0] == pytest.approx(row["scores"][1]["value"] - row["scores"][0]["value"])
    assert "Δ 2" in r.stdout and "my_local_task" in r.stdout


@pytest.mark.slow
def test_offline_suite_runs_without_network(tmp_path):
    r = camelid_cli("eval", "--tasks", "camelid-offline", "--limit", "1", "--json", timeout=900)
    assert r.returncode == 0, r.stderr
    tasks = {t["task"]: t for t in json.loads(r.stdout)["tasks"]}
    assert "camelid-offline" in tasks and len(tasks) == 5
    assert all(0 <= t["scores"][0]["value"] <= 1 for t in tasks.values())


def test_server_scores_equal_the_in_process_backend(folder, both):
    """lm-eval's local-completions against `camelid serve` (echo + logprobs on the prompt) scores like CamelidLM."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    ours, _ = both
    pairs = [p for p in REQUESTS if p[0]]  # local-completions needs a context
    want = ours.loglikelihood(_instances(pairs), disable_tqdm=True)
    with running_server(folder, "--reference") as (base, _):
        api = LocalCompletionsAPI(base_url=base + "/v1/completions", model=folder.stem, tokenizer_backend="huggingface",
                                  tokenizer=str(folder), num_concurrent=1, max_retries=1,
                                  add_bos_token=True)  # lm-eval's API models leave BOS out unless asked; this model adds it
        got = api.loglikelihood(_instances(pairs), disable_tqdm=True)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, want):
        assert lp == pytest.approx(lp_ref, abs=1e-3) and greedy == greedy_ref


def test_echo_logprobs_shape(folder):
    import httpx

    with running_server(folder, "--reference") as (base, _):
        ids = [1, 40, 41, 42, 43]
        body = httpx.post(base + "/v1/completions", json={"prompt": ids, "max_tokens": 0, "logprobs": 2, "echo": True,
                                                           "temperature": 0}, timeout=60).json()
        lp = body["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
        assert all(len(t) == 2 and max(t.values()) >= v for t, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
        assert all(v <= 0 and math.isfinite(v) for v in lp["token_logprobs"][1:])
        r = httpx.post(base + "/v1/completions", json={"prompt": ids, "echo": True, "stream": True, "logprobs": 1}, timeout=60)
        assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


# --- bad inputs: one line each ---

def test_unknown_task_is_one_line(folder):
    line = one_line_error(camelid_cli("eval", str(folder), "--tasks", "no_such_task_xyz", timeout=900))
    assert "unknown task 'no_such_task_xyz'" in line


def test_yaml_with_a_missing_data_file_is_one_line(tmp_path, folder):
    y = _local_task(tmp_path, ROWS, data="missing.jsonl")
    line = one_line_error(camelid_cli("eval", str(folder), "--tasks", str(y), timeout=900))
    assert "data file not found: missing.jsonl" in line
    line = one_line_error(camelid_cli("eval", str(folder), "--tasks", str(tmp_path / "nope.yaml"), timeout=900))
    assert "no such task file" in line


def test_a_model_that_does_not_fit_is_one_line(folder, monkeypatch, capsys):
    from camelid.cli import main
    from camelid.eval import run

    monkeypatch.setattr(run, "available_memory", lambda: 1000)
    assert main(["eval", str(folder), "--tasks", "camelid-offline"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("camelid: error:") and "does not fit" in err[0] and "GiB" in err[0]


def test_without_lm_eval_the_command_says_how_to_install(monkeypatch, capsys):
    import sys

    from camelid.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of it now fails
    assert main(["eval", "--tasks", "camelid-offline"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("camelid: error:") and "pip install 'camelid[eval]'" in line


def test_logits_at_several_positions_per_row(folder):
    import camelid

    llm = camelid.load(folder, quant=None)
    x = torch.randint(3, 300, (2, 9))
    full = llm.model(x)
    at = torch.tensor([[1, 4, 8], [0, 2, 3]])
    some = llm.model(x, logits_at=at)
    assert torch.allclose(some, full[torch.arange(2)[:, None], at], atol=1e-5)
