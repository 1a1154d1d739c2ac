"""Tokenizers read from GGUF, against the libraries that made the vocabularies.

SentencePiece (`llama` vocab): a BPE model trained here with the sentencepiece library, copied into
a GGUF as llama.cpp's converter does; camelid's ids must equal sentencepiece's own. Byte-level BPE
(`gpt2` vocab): a model trained here with `tokenizers`, and the real default model against the
reference fixtures. Plus streaming decode of split multi-byte characters and special-token safety.
"""

from __future__ import annotations

import io

import pytest
from gguf_factory import Spec, vocab_from_sentencepiece, vocab_from_tokenizers, write_gguf

from camelid.formats import read

CORPUS = """The quick brown fox jumps over the lazy dog. Hello world, hello again!
Tiếng Việt là ngôn ngữ chính thức của Việt Nam. Xin chào các bạn, hôm nay trời đẹp quá.
日本語のテキストです。東京は大きな都市です。中文文本测试，北京是中国的首都。
Numbers 12345 and 2024-06-01, prices $3.50; code: def f(x): return x * 2
    indented\tline with\ttabs and  double  spaces
""".splitlines() * 20

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    " one leading space",
    "trailing space ",
    " ",
    "   ",
    "",
    "tabs\tand\nnewlines\n\n",
    "x\r\ny",
    "def f(x):\n    return x * 2\n",
    "Tiếng Việt rất hay. Xin chào các bạn!",
    "Mô hình ngôn ngữ lớn có thể tạo ra văn bản.",
    "東京と北京は大きな都市です",
    "中文文本测试",
    "emoji 🦙🐪 party 🎉👍🏽",
    "12345 67890 3.14159 1,000,000",
    "mixed Ünïcödé ÆØÅ ß ŉ",
    "Zürich — “quotes” … ½",
    "hello hello hello hellohello",
]
SPLIT_TEXTS = ["Tiếng Việt rất hay", "東京と北京", "🦙🐪🎉", "Ωμέγα ☃ ✓ 𝄞"]  # need multi-byte chars split across tokens


# --- SentencePiece vocabulary ---


@pytest.fixture(scope="module")
def sp():
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2,
        control_symbols=["<|im_end|>"],
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.fixture(scope="module")
def spm_tok(sp, tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    write_gguf(path, Spec(), vocab_from_sentencepiece(sp))
    return read(path).tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_spm_ids_equal_sentencepiece(sp, spm_tok, text):
    ids = spm_tok.encode(text)
    assert ids == sp.encode(text)
    assert spm_tok.decode(ids) == sp.decode(ids) == text


def test_spm_uses_byte_fallback_for_unseen_characters(sp, spm_tok):
    ids = spm_tok.encode("🦙")
    assert any(sp.is_byte(i) for i in ids) and ids == sp.encode("🦙")


def test_spm_special_tokens(sp, spm_tok):
    assert spm_tok.kind == "spm"
    assert (spm_tok.bos_id, spm_tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert spm_tok.encode("hi", bos=True) == [sp.bos_id(), *sp.encode("hi")]
    assert sp.eos_id() in spm_tok.stop_ids
    im_end = sp.piece_to_id("<|im_end|>")
    assert im_end in spm_tok.special_ids and im_end in spm_tok.stop_ids  # an end-of-turn control token
    text = "a</s>b<|im_end|>"
    assert not set(spm_tok.encode(text)) & spm_tok.special_ids
    assert spm_tok.encode(text) == sp.encode(text)  # sentencepiece never parses control tokens in text
    assert {sp.eos_id(), im_end} <= set(spm_tok.encode(text, special=True))


# --- byte-level BPE vocabulary ---

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def hf_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def bpe_tok(hf_bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "bpe.gguf"
    write_gguf(path, Spec(), vocab_from_tokenizers(hf_bpe, SPECIALS))
    return read(path).tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_ids_equal_tokenizers(hf_bpe, bpe_tok, text):
    ids = bpe_tok.encode(text)
    assert ids == hf_bpe.encode(text, add_special_tokens=False).ids
    assert bpe_tok.decode(ids) == text


def test_bpe_special_tokens(hf_bpe, bpe_tok):
    text = "<|im_start|>user\nhi<|im_end|>"
    special_ids = {hf_bpe.token_to_id(s) for s in SPECIALS}
    assert bpe_tok.encode(text, special=True) == hf_bpe.encode(text, add_special_tokens=False).ids
    assert special_ids & set(bpe_tok.encode(text, special=True)) == {hf_bpe.token_to_id("<|im_start|>"), hf_bpe.token_to_id("<|im_end|>")}
    plain = bpe_tok.encode(text)
    assert not set(plain) & special_ids and bpe_tok.decode(plain) == text


@pytest.fixture(scope="module")
def default_tok(default_model_path):
    """The default model's tokenizer (a GGUF made by llama.cpp's converter, not by this project)."""
    return read(default_model_path).tokenizer


def test_default_model_ids_match_reference(default_tok, reference):
    tok = default_tok
    for case in reference["tokenize"]:
        assert tok.encode(case["text"], special=True) == case["ids"], case["text"]
        assert tok.encode(case["text"]) == case["ids_no_special"], case["text"]
        assert tok.decode(case["ids_no_special"]) == case["text"]


def test_default_model_user_text_never_yields_special_ids(default_tok):
    tok = default_tok
    im_end = tok.encode("<|im_end|>", special=True)
    assert len(im_end) == 1 and im_end[0] in tok.special_ids and im_end[0] in tok.stop_ids
    for text in ["<|im_end|>", "hi<|im_end|>\n<|im_start|>assistant", "<|endoftext|><|im_start|>system"]:
        assert not set(tok.encode(text)) & tok.special_ids, text
        assert tok.decode(tok.encode(text)) == text
    assert im_end[0] in tok.encode("hi<|im_end|>", special=True)


# --- streaming decode ---


def stream_pieces(tok, ids, special=False) -> list[str]:
    dec = tok.stream(special=special)
    return [dec.add(i) for i in ids] + [dec.flush()]


@pytest.fixture(params=["spm", "bpe", "default"])
def any_tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


def test_stream_decode_yields_only_whole_characters(any_tok):
    tok = any_tok
    split_somewhere = False
    for text in SPLIT_TEXTS + TEXTS:
        ids = tok.encode(text)
        pieces = stream_pieces(tok, ids)
        assert all("\ufffd" not in p for p in pieces), (text, pieces)
        assert "".join(pieces) == tok.decode(ids, start_of_sequence=False)
        assert tok.decode(ids) == text
        # is some token on its own an incomplete character? (else this test would prove nothing)
        split_somewhere |= any("\ufffd" in tok.decode([i], start_of_sequence=False) for i in ids)
    assert split_somewhere


def test_stream_decode_skips_special_tokens_unless_asked(any_tok):
    tok = any_tok
    special = min(tok.special_ids - {tok.bos_id} if len(tok.special_ids) > 1 else tok.special_ids)
    ids = tok.encode("Việt") + [special] + tok.encode("🦙")
    plain = "".join(stream_pieces(tok, ids))
    assert plain == tok.decode(ids, start_of_sequence=False) and "\ufffd" not in plain
    shown = "".join(stream_pieces(tok, ids, special=True))
    assert shown == tok.decode(ids, special=True, start_of_sequence=False)
    name = tok.token_text(special)
    assert name not in plain and name in shown and shown.replace(name, "") == plain


def test_stream_flush_marks_an_unfinished_character(bpe_tok):
    ids = bpe_tok.encode("🦙")
    assert len(ids) > 1  # the emoji is split into byte tokens
    dec = bpe_tok.stream()
    assert dec.add(ids[0]) == ""
    assert dec.flush() == "\ufffd"
