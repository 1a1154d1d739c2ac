"""Hugging Face folders, written by transformers' own save_pretrained, against transformers' LlamaForCausalLM.

Tiny random models (dim 64, 2 layers, GQA) with a byte-level BPE trained here; the folders differ in
config style, tied embeddings, RoPE scaling, sharding and dtype. camelid's logits must match
transformers' on the very same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from camelid.errors import FormatError
from camelid.formats import read
from camelid.loader import build_model

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEXT = [
    "The quick brown fox jumps over the lazy dog while the camel waits by the well.",
    "Llamas and alpacas are camelids; they live in the Andes and carry loads for farmers.",
    "In 1983, 42 engineers wrote 7 compilers, 19 editors and 3 operating systems.",
    "Numbers like 3.14159, 2.71828 and 1.41421 appear in mathematics again and again.",
    "Ünïcödé text: naïve café, résumé, Straße, 東京, and emoji 🐪🦙 should survive a round trip.",
    "def add(a, b):\n    return a + b  # a tiny function\n\nprint(add(2, 3))",
    "She said: 'It's fine, we'll see; they're here and I'm ready.' He didn't reply.",
    "Tokenizers split text into pieces; byte-level BPE never needs an unknown token.",
    "Rotary position embeddings rotate query and key pairs by angles that grow with position.",
    "A sharded checkpoint stores its tensors in several files with an index that maps names to files.",
]
PROBE = "Hello camelid! Llamas, alpacas & 東京 🦙: 12345 tokens\n\tand 'quotes' don't break."


def train_bpe(vocab_size: int = 320):
    """A byte-level BPE with Llama 3's pre-tokenizer, BOS post-processor and a few special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from camelid.tokenizer import byte_level_pre_tokenizer

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = byte_level_pre_tokenizer("llama3")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return tok


def llama_config(vocab_size: int, **over):
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=vocab_size, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=4)
    base.update(over)
    return transformers.LlamaConfig(**base)


def random_model(config, seed: int = 0):
    """LlamaForCausalLM with weights large enough that every part of the network shows in the logits."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


def to_classic_style(folder: Path) -> None:
    """Rewrite config.json from `rope_parameters` into the classic `rope_theta` + `rope_scaling` keys."""
    cfg = json.loads((folder / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = None if params.get("rope_type") == "default" else params
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def save_folder(folder: Path, model, tok, classic: bool = False, dtype: torch.dtype | None = None, max_shard_size=None) -> Path:
    """The model and tokenizer as a Hugging Face folder, written by transformers."""
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(folder)
    if classic:
        to_classic_style(folder)
    return folder


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """transformers' own reading of the folder, run in float32."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def camelid_logits(path: Path, ids: list[int]) -> torch.Tensor:
    model = build_model(read(path))
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.fixture(scope="module")
def tok():
    return train_bpe()


@pytest.fixture(scope="module")
def ids(tok) -> list[int]:
    out = tok.encode(" ".join(TEXT[:4])).ids
    assert len(out) > 60
    return out[:80]


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


@pytest.mark.parametrize("classic", [False, True], ids=["rope_parameters", "classic"])
@pytest.mark.parametrize("variant", ["untied", "tied", "llama3-rope", "sharded"])
def test_logits_match_transformers(tmp_path, tok, ids, classic, variant):
    over = {"tie_word_embeddings": variant == "tied"}
    if variant == "llama3-rope":  # short original context so the scaling changes frequencies this tiny head uses
        over["rope_scaling"], over["rope_theta"] = dict(LLAMA3_SCALING), 500000.0
    model = random_model(llama_config(tok.get_vocab_size(), **over))
    folder = save_folder(tmp_path / "m", model, tok, classic=classic, max_shard_size="40KB" if variant == "sharded" else None)
    if variant == "sharded":
        assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 2
    ckpt = read(folder)
    assert ckpt.format == "hf"
    assert ckpt.info["config_style"] == ("rope_theta/rope_scaling" if classic else "rope_parameters")
    assert ckpt.config.tie_embeddings == (variant == "tied")
    assert (ckpt.config.rope_scaling is not None) == (variant == "llama3-rope")
    expected = hf_logits(folder, ids)
    got = camelid_logits(folder, ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_llama3_scaling_is_not_a_no_op(tmp_path, tok, ids):
    """The scaled folder's logits differ from the same weights without scaling (the test above can fail)."""
    model = random_model(llama_config(tok.get_vocab_size(), rope_scaling=dict(LLAMA3_SCALING), rope_theta=500000.0))
    scaled = camelid_logits(save_folder(tmp_path / "a", model, tok), ids)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    plain_folder = save_folder(tmp_path / "b", model, tok)
    assert json.loads((plain_folder / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    plain = camelid_logits(plain_folder, ids)
    assert (scaled - plain).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files(tmp_path, tok, ids, dtype):
    model = random_model(llama_config(tok.get_vocab_size()))
    folder = save_folder(tmp_path / "m", model, tok, dtype=dtype)
    ckpt = read(folder)
    assert ckpt.info["tensor_types"] == [{torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]]
    torch.testing.assert_close(camelid_logits(folder, ids), hf_logits(folder, ids), atol=2e-4, rtol=1e-4)


def test_tokenizer_matches_transformers(tmp_path, tok):
    folder = save_folder(tmp_path / "m", random_model(llama_config(tok.get_vocab_size())), tok)
    ours = read(folder).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in [PROBE, *TEXT]:
        expected = theirs(text)["input_ids"]
        assert expected[0] == theirs.convert_tokens_to_ids("<|begin_of_text|>")  # their post-processor adds BOS
        assert ours.encode(text, bos=True) == expected
        assert ours.decode(expected[1:]) == text
    assert ours.bos_id == theirs.convert_tokens_to_ids("<|begin_of_text|>")
    assert ours.eos_id == theirs.convert_tokens_to_ids("<|eot_id|>")
    assert ours.chat_template.startswith("{% for m in messages %}")
    # special-token names typed as text stay text
    assert ours.encode("<|eot_id|>") != [ours.eos_id]
    assert ours.encode("<|eot_id|>", special=True) == [ours.eos_id]


def test_generation_config_end_of_turn_ids(tmp_path, tok):
    folder = save_folder(tmp_path / "m", random_model(llama_config(tok.get_vocab_size())), tok)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4], "bos_token_id": 0}))
    ours = read(folder).tokenizer
    assert {1, 4} <= ours.stop_ids


def test_no_bos_rule_without_template(tmp_path, tok):
    """A tokenizer whose post-processor adds no BOS (SmolLM2-style) does not get one."""
    from tokenizers import processors

    tok2 = train_bpe()
    tok2.post_processor = processors.ByteLevel(trim_offsets=False)
    folder = save_folder(tmp_path / "m", random_model(llama_config(tok2.get_vocab_size())), tok2)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("add_bos_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = read(folder).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.add_bos is False
    assert ours.encode(PROBE, bos=True) == theirs(PROBE)["input_ids"]


def test_sentencepiece_converted_tokenizer_json(tmp_path):
    """A Llama 2 style folder: transformers converts a SentencePiece model into tokenizer.json."""
    spm = pytest.importorskip("sentencepiece")
    from test_formats_meta import train_sentencepiece

    model_file = train_sentencepiece(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(model_file.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False}))
    theirs = transformers.AutoTokenizer.from_pretrained(src)  # converts the SentencePiece model to tokenizer.json
    theirs.save_pretrained(tmp_path / "m")
    model = random_model(llama_config(theirs.vocab_size, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.model").unlink(missing_ok=True)  # make sure tokenizer.json is what is read
    ours = read(tmp_path / "m").tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for text in [PROBE, *TEXT]:
        assert ours.encode(text, bos=True) == [1, *sp.encode(text)] == theirs(text)["input_ids"]
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert ours.kind == "spm"


def test_folder_detection_reason(tmp_path, tok):
    folder = save_folder(tmp_path / "m", random_model(llama_config(tok.get_vocab_size())), tok, max_shard_size="40KB")
    reason = read(folder).info["format_reason"]
    assert reason.startswith("found config.json and ") and "index" in reason


# --- bad input: one clear FormatError ---


def test_empty_folder(tmp_path):
    with pytest.raises(FormatError, match="no model weights"):
        read(tmp_path)


def test_config_without_weights(tmp_path, tok):
    folder = save_folder(tmp_path / "m", random_model(llama_config(tok.get_vocab_size())), tok)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="config.json but no"):
        read(folder)


def test_missing_shard(tmp_path, tok):
    folder = save_folder(tmp_path / "m", random_model(llama_config(tok.get_vocab_size())), tok, max_shard_size="40KB")
    victim = sorted(folder.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FormatError, match=f"shard {victim.name} .* missing"):
        read(folder)


def test_mismatched_shape(tmp_path, tok):
    from safetensors.torch import load_file, save_file

    folder = save_folder(tmp_path / "m", random_model(llama_config(tok.get_vocab_size())), tok)
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    ckpt = read(folder)
    with pytest.raises(FormatError, match="layers.1.feed_forward.w3.weight has shape"):
        build_model(ckpt)


def test_not_a_safetensors_file(tmp_path, tok):
    folder = save_folder(tmp_path / "m", random_model(llama_config(tok.get_vocab_size())), tok)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(FormatError, match="not a safetensors file"):
        read(folder)
