"""Stop strings and streaming text on the default model's tokenizer."""

from __future__ import annotations

from camelid.textstream import TextStream


def run(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = [stream.add(i) for i in tokenizer.encode(text)]
    pieces.append(stream.finish())
    return [p for p in pieces if p], stream


def test_no_stop_gives_the_text_back(llm):
    text = "Mô hình ngôn ngữ lớn 🦙 and 日本語"
    pieces, stream = run(llm.tokenizer, text, [])
    assert "".join(pieces) == text == stream.text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_cut_and_never_emitted(llm):
    pieces, stream = run(llm.tokenizer, "one two three four five", [" four"])
    assert "".join(pieces) == "one two three"
    assert stream.stopped


def test_stop_string_across_tokens_is_held_back_until_decided(llm):
    # "thr" could start "three": it must not be shown before we know
    pieces, stream = run(llm.tokenizer, "one two thrice", ["three"])
    assert "".join(pieces) == "one two thrice" and not stream.stopped
    pieces, stream = run(llm.tokenizer, "one two three", ["three", "tw"])
    assert "".join(pieces) == "one " and stream.stopped
