"""The `camelid` command as a user runs it: a real subprocess, stdout for answers, one line on errors."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import camelid_cli, one_line_error

camelid = camelid_cli


def assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert needle in one_line_error(r)


def test_run_answers_with_the_default_model(default_model_path):
    r = camelid("run", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_run_raw_with_model_path_is_greedy_completion(default_model_path, reference):
    case = reference["greedy"][0]
    r = camelid("run", str(default_model_path), case["prompt"], "--raw", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == case["text"][: len(r.stdout.rstrip("\n"))] and r.stdout.startswith(" Paris.")


def test_tokenize_prints_json_ids(default_model_path, reference):
    case = reference["tokenize"][-1]  # contains special-token names
    plain = camelid("tokenize", case["text"])
    special = camelid("tokenize", str(default_model_path), case["text"], "--special")
    assert json.loads(plain.stdout) == case["ids_no_special"]
    assert json.loads(special.stdout) == case["ids"]


def test_info_describes_the_model(default_model_path):
    r = camelid("info", "--json")
    info = json.loads(r.stdout)
    assert info["config"]["max_seq_len"] == 8192 and info["config"]["n_layers"] == 30
    assert info["info"]["quantization"] == "Q4_1" and info["chat template"] == "model"
    text = camelid("info").stdout
    assert "context length" in text and "gguf" in text


def test_perplexity_command_matches_the_api(default_model_path, llm, tmp_path):
    from camelid.eval.perplexity import perplexity

    text = "Llamas live in the Andes. They carry loads and give wool.\n"
    f = tmp_path / "t.txt"
    f.write_text(text)
    r = camelid("perplexity", str(f), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = perplexity(llm.model, llm.tokenizer.encode(text, bos=True))
    assert out["tokens"] == expected.tokens and out["perplexity"] == pytest.approx(expected.perplexity, rel=1e-4)


def test_chat_repl_commands(default_model_path):
    script = "/system You answer in one short sentence.\nWhat is the capital of France?\n/reset\n/bogus\n/exit\n"
    r = camelid("chat", "--max-tokens", "30", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "system prompt set" in r.stderr and "conversation cleared" in r.stderr and "unknown command /bogus" in r.stderr


def test_list_and_pull_show_the_default(default_model_path):
    assert "smollm2-135m-instruct" in camelid("list").stdout
    assert camelid("pull").stdout.strip().endswith(".gguf")  # already there: prints its path at once


@pytest.mark.parametrize("args, needle", [
    (["run", "/no/such/model.gguf", "hi"], "no such file"),
    (["run", "not-a-model-name", "hi"], "unknown model"),
    (["run", "hi", "--temperature", "-1"], "temperature"),
    (["run", "hi", "--top-p", "0"], "top_p"),
    (["run", "hi", "--max-tokens", "-5"], "max-tokens"),
    (["perplexity", "/no/such/file.txt"], "no such file"),
    (["rm", "never-pulled"], "not in the store"),
    (["info", "/"], "no model"),
])
def test_bad_input_is_one_line(default_model_path, args, needle):
    assert_one_line_error(camelid(*args), needle)


def test_not_a_gguf_and_truncated_gguf(default_model_path, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello")
    assert_one_line_error(camelid("run", str(junk), "hi"), "not a GGUF file")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path.read_bytes()[:3_000_000])
    assert_one_line_error(camelid("run", str(cut), "hi"), "corrupt or truncated")


def test_prompt_longer_than_the_context(default_model_path):
    r = camelid("run", "--raw", "hello " * 9000)
    assert_one_line_error(r, "context window")
