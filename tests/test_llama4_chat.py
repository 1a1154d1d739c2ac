"""Llama 4 chat prompts: the model's template renders byte for byte as transformers' apply_chat_template does
(with Llama 4's real template, tests/data/llama4_chat_template.jinja); the built-in `llama-4` one agrees with it
on plain conversations; generation stops on <|eot|>, <|eom|> and <|end_of_text|>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from camelid.chat import BUILTIN, encode_chat, render, template_for
from camelid.formats.hf import read_tokenizer

transformers = pytest.importorskip("transformers")
import llama4_factory as F  # noqa: E402

TEMPLATE = (Path(__file__).parent / "data" / "llama4_chat_template.jinja").read_text()
DIALOGS = [
    [{"role": "user", "content": "Hello, llama!"}],
    [{"role": "system", "content": "  You are a camelid.  "}, {"role": "user", "content": "Why the Andes?"},
     {"role": "assistant", "content": "Thin air, good grass."}, {"role": "user", "content": "And 東京? 🦙"}],
    [{"role": "user", "content": "Say <|eot|> please"}, {"role": "assistant", "content": " spaced \n"},
     {"role": "user", "content": "ok"}],
]


def folder(tmp_path: Path, template: str | None) -> Path:
    d = tmp_path / ("model" if template else "plain")
    d.mkdir()
    F.train_tokenizer().save(str(d / "tokenizer.json"))
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "add_bos_token": False,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    if template:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("dialog", DIALOGS)
def test_model_template_matches_apply_chat_template(tmp_path, dialog):
    d = folder(tmp_path, TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    tok = read_tokenizer(d, 320)
    source, where = template_for(tok)
    assert where == "model"
    want = hf.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    assert render(source, dialog, tok).encode() == want.encode()
    if "<|eot|> please" not in dialog[0]["content"]:  # camelid keeps typed special names as text, by design
        assert encode_chat(tok, dialog) == hf.apply_chat_template(dialog, tokenize=True, add_generation_prompt=True,
                                                                 return_dict=False)


def test_builtin_llama4_agrees_with_the_real_template(tmp_path):
    tok = read_tokenizer(folder(tmp_path, None), 320)
    source, where = template_for(tok)
    assert where == "built-in llama-4" and source == BUILTIN["llama-4"]
    hf = transformers.AutoTokenizer.from_pretrained(folder(tmp_path, TEMPLATE))
    for dialog in (DIALOGS[0], [{"role": "system", "content": "Be brief."}, *DIALOGS[1][1:]]):
        assert render(source, dialog, tok) == hf.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    assert render(source, DIALOGS[0], tok) == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\nHello, llama!"
                                               "<|eot|><|header_start|>assistant<|header_end|>\n\n")


def test_stops_on_eot_eom_and_end_of_text(tmp_path):
    tok = read_tokenizer(folder(tmp_path, None), 320)
    names = {tok.backend.id_to_token(i) for i in tok.stop_ids}
    assert {"<|eot|>", "<|eom|>", "<|end_of_text|>"} <= names
    assert "<|header_end|>" not in names
