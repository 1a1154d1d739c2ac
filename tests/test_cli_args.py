"""Options anywhere on the command line: before, between or after a command's positional arguments."""

from __future__ import annotations

import functools
import sys

import pytest
from conftest import camelid_cli, one_line_error

from camelid.cli import parse_args

run = functools.partial(camelid_cli, timeout=120)


def _same(*lines: list[str]) -> None:
    """Every line parses to the same namespace as the first."""
    first = vars(parse_args(lines[0]))
    for line in lines[1:]:
        got = vars(parse_args(line))
        assert got == first, (line, got, first)


# (command line with options last, the same with options first, with options between)
CASES = {
    "run": (["run", "M", "Hi there", "--max-tokens", "5", "--raw", "--stop", "x", "--speculate", "ngram"],
            ["run", "--max-tokens", "5", "--raw", "--stop", "x", "--speculate", "ngram", "M", "Hi there"],
            ["run", "M", "--max-tokens", "5", "Hi there", "--speculate", "ngram", "--raw", "--stop", "x"]),
    "chat": (["chat", "M", "--system", "Be brief", "--temperature", "0.2"],
             ["chat", "--system", "Be brief", "--temperature", "0.2", "M"],
             ["chat", "--system", "Be brief", "M", "--temperature", "0.2"]),
    "tokenize": (["tokenize", "M", "Hi", "--special", "--bos"],
                 ["tokenize", "--special", "--bos", "M", "Hi"],
                 ["tokenize", "M", "--special", "Hi", "--bos"]),
    "embed": (["embed", "M", "Hi", "there", "--pooling", "last", "--json"],
              ["embed", "--pooling", "last", "--json", "M", "Hi", "there"],
              ["embed", "M", "--pooling", "last", "Hi", "--json", "there"]),
    "perplexity": (["perplexity", "M", "f.txt", "--context", "64", "--json", "--chunks"],
                   ["perplexity", "--context", "64", "--chunks", "--json", "M", "f.txt"],
                   ["perplexity", "M", "--context", "64", "f.txt", "--chunks", "--json"]),
    "eval": (["eval", "M", "--tasks", "t", "--limit", "2", "--json"], ["eval", "--tasks", "t", "--limit", "2", "--json", "M"],
             ["eval", "--tasks", "t", "M", "--limit", "2", "--json"]),
    "quantize": (["quantize", "M", "--to", "q8_0", "--out", "o.gguf", "--no-eval"],
                 ["quantize", "--to", "q8_0", "--out", "o.gguf", "--no-eval", "M"],
                 ["quantize", "--to", "q8_0", "M", "--out", "o.gguf", "--no-eval"]),
    "info": (["info", "M", "--json", "--template"], ["info", "--json", "--template", "M"], ["info", "--json", "M", "--template"]),
    "compile": (["compile", "M", "--quant", "int8", "--force"], ["compile", "--quant", "int8", "--force", "M"],
                ["compile", "--force", "M", "--quant", "int8"]),
    "bench": (["bench", "M", "--json", "--repeats", "1"], ["bench", "--json", "--repeats", "1", "M"],
              ["bench", "--json", "M", "--repeats", "1"]),
    "serve": (["serve", "M", "--port", "9", "--api-key", "k"], ["serve", "--port", "9", "--api-key", "k", "M"],
              ["serve", "--port", "9", "M", "--api-key", "k"]),
    "finetune": (["finetune", "M", "--data", "d.jsonl", "--out", "o", "--rank", "4", "--resume"],
                 ["finetune", "--data", "d.jsonl", "--out", "o", "--rank", "4", "--resume", "M"],
                 ["finetune", "--data", "d.jsonl", "M", "--out", "o", "--rank", "4", "--resume"]),
    "export": (["export", "M", "--adapter", "a", "--to", "gguf", "--out", "o.gguf", "--force"],
               ["export", "--adapter", "a", "--to", "gguf", "--out", "o.gguf", "--force", "M"],
               ["export", "--adapter", "a", "M", "--to", "gguf", "--out", "o.gguf", "--force"]),
    "pull": (["pull", "N", "--force"], ["pull", "--force", "N"], ["pull", "--force", "N"]),
    "rm": (["rm", "N"], ["rm", "N"], ["rm", "N"]),
    "list": (["list", "--json"], ["list", "--json"], ["list", "--json"]),
    "tokenizer": (["tokenizer", "train", "a.txt", "b/", "--vocab-size", "300", "--out", "t"],
                  ["tokenizer", "train", "--vocab-size", "300", "--out", "t", "a.txt", "b/"],
                  ["tokenizer", "train", "a.txt", "--vocab-size", "300", "b/", "--out", "t"]),
    "keys": (["keys", "add", "N", "--file", "k.json", "--rpm", "3", "--models", "a,b"],
             ["keys", "add", "--file", "k.json", "--rpm", "3", "--models", "a,b", "N"],
             ["keys", "add", "--file", "k.json", "N", "--rpm", "3", "--models", "a,b"]),
    "audit": (["audit", "show", "log.jsonl", "--key", "k", "--since", "2h", "--json"],
              ["audit", "show", "--key", "k", "--since", "2h", "--json", "log.jsonl"],
              ["audit", "show", "--key", "k", "log.jsonl", "--since", "2h", "--json"]),
    "prepare": (["prepare", "a.txt", "b/", "--tokenizer", "t", "--out", "d"], ["prepare", "--tokenizer", "t", "--out", "d",
                "a.txt", "b/"], ["prepare", "a.txt", "--tokenizer", "t", "b/", "--out", "d"]),
    "pretrain": (["pretrain", "--preset", "tiny", "--data", "d", "--out", "o", "--steps", "3", "--resume"],
                 ["pretrain", "--resume", "--steps", "3", "--out", "o", "--data", "d", "--preset", "tiny"],
                 ["pretrain", "--data", "d", "--resume", "--preset", "tiny", "--out", "o", "--steps", "3"]),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_options_anywhere(command):
    _same(*CASES[command])


def test_every_command_is_covered():
    from camelid.cli import build_parser

    assert set(build_parser().commands) <= set(CASES), \
        "a new command needs its option-order case here"


def test_positionals_are_read_in_order():
    args = parse_args(["run", "--max-tokens", "3", "M", "--temperature", "0", "the prompt"])
    assert args.args == ["M", "the prompt"] and args.max_tokens == 3 and args.temperature == 0


def test_too_many_positionals_say_how_the_line_was_read():
    line = one_line_error(run("run", "hello", "big", "world"))
    assert "took 'hello' as MODEL and 'big' as PROMPT" in line and "quote" in line


def test_a_word_taken_as_model_says_so(isolated_home):
    line = one_line_error(run("run", "hello", "world", "--max-tokens", "1"))
    assert "took 'hello' as MODEL and 'world' as PROMPT" in line


def test_model_after_text_says_model_comes_first(isolated_home, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    line = one_line_error(run("tokenize", "Hi", str(model)))
    assert "took 'Hi' as MODEL" in line and "MODEL comes first" in line


def test_parser_errors_are_one_line():
    assert "invalid int value" in one_line_error(run("run", "--max-tokens", "x", "hi"))
    assert "required" in one_line_error(run("run"))
    assert "invalid choice" in one_line_error(run("bogus"))


def test_a_missing_llama_cpp_fails_when_it_is_expected(monkeypatch):
    """`make test` sets CAMELID_REQUIRE_LLAMA_CPP=1: the interop tests must then fail, never skip, without the peer."""
    from conftest import require_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    monkeypatch.setenv("CAMELID_REQUIRE_LLAMA_CPP", "1")
    with pytest.raises(pytest.fail.Exception, match="expected"):
        require_llama_cpp()
    monkeypatch.delenv("CAMELID_REQUIRE_LLAMA_CPP")
    with pytest.raises(pytest.skip.Exception):
        require_llama_cpp()
