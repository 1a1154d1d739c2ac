"""Meta's original layout: params.json + consolidated.NN.pth + tokenizer.model (SentencePiece or tiktoken).

The same random weights are written as a Hugging Face folder (transformers' save_pretrained) and as
Meta checkpoints split the way Meta's model-parallel layers split them; camelid must give
transformers' logits for every one of them, and a two-shard checkpoint must equal its one-shard merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from camelid.config import RopeScaling
from camelid.errors import FormatError
from camelid.formats import hf, read
from camelid.formats.layout import half_to_interleaved, interleaved_to_half
from camelid.formats.tokenizers_io import llama3_special_tokens
from camelid.loader import build_model
from camelid.tokenizer import LLAMA3_PATTERN, byte_decoder

transformers = pytest.importorskip("transformers")
from test_formats_hf import PROBE, SPECIALS, TEXT, camelid_logits, hf_logits, llama_config, random_model, train_bpe  # noqa: E402

N_HEADS, N_KV, DIM = 4, 2, 64
PARAMS = {"dim": DIM, "n_layers": 2, "n_heads": N_HEADS, "n_kv_heads": N_KV, "multiple_of": 32, "norm_eps": 1e-5}
HIDDEN = 192  # Meta's FFN rule for dim 64, multiple_of 32: int(2 * 256 / 3) = 170 -> 192


def train_sentencepiece(tmp_path: Path) -> Path:
    """A Llama-style SentencePiece BPE model trained on TEXT: byte fallback, <unk>=0 <s>=1 </s>=2, no text
    normalization and whitespace kept as is (as in Llama 1/2's tokenizer.model)."""
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 4), model_prefix=str(prefix), vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return prefix.with_suffix(".model")


def tiktoken_ranks(tok) -> dict[bytes, int]:
    """tiktoken ranks: the 256 bytes, then the trained BPE's tokens in merge order."""
    table = byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for piece, _ in sorted(tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1]):
        if piece in SPECIALS:
            continue
        b = bytes(table[c] for c in piece)
        ranks.setdefault(b, len(ranks))
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: Path) -> Path:
    import base64

    path.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in ranks.items()))
    return path


def meta_state(model) -> dict[str, torch.Tensor]:
    """A transformers model's weights under Meta's names, Q/K rows in Meta's interleaved order."""
    state = {}
    for name, t in model.state_dict().items():
        canon = hf.canonical_name(name)
        if canon is None:
            continue
        t = t.detach().clone()
        if canon.endswith("wq.weight"):
            t = half_to_interleaved(t, N_HEADS)
        elif canon.endswith("wk.weight"):
            t = half_to_interleaved(t, N_KV)
        state[canon] = t
    return state


def split(state: dict[str, torch.Tensor], n: int, vocab_parallel: bool) -> list[dict[str, torch.Tensor]]:
    """Meta's model-parallel split: column-parallel on dim 0, row-parallel on dim 1, norms replicated."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in state.items():
        if "norm" in name:
            parts = [t.clone() for _ in range(n)]
        elif name.endswith(("wo.weight", "w2.weight")):
            parts = t.chunk(n, dim=1)
        elif name == "tok_embeddings.weight":
            parts = t.chunk(n, dim=0 if vocab_parallel else 1)
        else:
            parts = t.chunk(n, dim=0)
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone().contiguous()
    return shards


def write_meta(folder: Path, shards, params: dict, tokenizer_model: Path) -> Path:
    folder.mkdir(parents=True)
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    return folder


@pytest.fixture(scope="module")
def llama3_setup(tmp_path_factory):
    """A Llama 3 style model: tiktoken vocabulary + 256 specials, llama3 RoPE scaling, HF folder beside it."""
    tmp = tmp_path_factory.mktemp("llama3")
    tok = train_bpe()
    ranks = tiktoken_ranks(tok)
    vocab = len(ranks) + 256
    config = llama_config(vocab, intermediate_size=HIDDEN, rope_theta=500000.0, max_position_embeddings=131072,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})
    model = random_model(config, seed=3)
    model.save_pretrained(tmp / "hf")
    params = {**PARAMS, "vocab_size": vocab, "rope_theta": 500000.0, "use_scaled_rope": True}
    return {"tmp": tmp, "model": model, "ranks": ranks, "params": params,
            "tiktoken": write_tiktoken(ranks, tmp / "tokenizer.model"), "hf": tmp / "hf"}


@pytest.fixture(scope="module")
def ids(llama3_setup) -> list[int]:
    return read_tiktoken_tokenizer(llama3_setup).encode(" ".join(TEXT[:4]), bos=True)[:70]


def read_tiktoken_tokenizer(setup):
    from camelid.formats.tokenizers_io import from_tiktoken

    return from_tiktoken(setup["tiktoken"])


@pytest.mark.parametrize("n_shards", [1, 2])
def test_llama3_meta_matches_transformers(llama3_setup, ids, n_shards):
    s = llama3_setup
    folder = write_meta(s["tmp"] / f"meta{n_shards}", split(meta_state(s["model"]), n_shards, vocab_parallel=True),
                        s["params"], s["tiktoken"])
    ckpt = read(folder)
    assert ckpt.format == "meta" and ckpt.info["shards"] == n_shards
    assert ckpt.info["format_reason"] == f"found params.json and {n_shards} consolidated.*.pth shard{'s' if n_shards > 1 else ''}"
    assert ckpt.config.rope_scaling is not None and ckpt.config.max_seq_len == 131072
    torch.testing.assert_close(camelid_logits(folder, ids), hf_logits(s["hf"], ids), atol=2e-4, rtol=1e-4)


def test_two_shards_equal_one_shard_merge(llama3_setup, ids):
    s = llama3_setup
    state = meta_state(s["model"])
    one = read(write_meta(s["tmp"] / "merge1", split(state, 1, True), s["params"], s["tiktoken"]))
    two = read(write_meta(s["tmp"] / "merge2", split(state, 2, True), s["params"], s["tiktoken"]))
    assert one.tensors.keys() == two.tensors.keys()
    for name in one.tensors:
        assert one.tensors[name].shape == two.tensors[name].shape
        assert torch.equal(one.tensors[name].load(), two.tensors[name].load()), name


def test_llama2_style_meta(tmp_path, ids):
    """SentencePiece tokenizer, vocab_size -1 in params.json, embeddings split on the model dim."""
    sp_model = train_sentencepiece(tmp_path)
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    model = random_model(llama_config(vocab, intermediate_size=HIDDEN, rope_theta=10000.0), seed=5)
    model.save_pretrained(tmp_path / "hf")
    params = {**PARAMS, "vocab_size": -1}
    for n in (1, 2):
        folder = write_meta(tmp_path / f"meta{n}", split(meta_state(model), n, vocab_parallel=False), params, sp_model)
        ckpt = read(folder)
        assert ckpt.config.vocab_size == vocab and ckpt.config.max_seq_len == 4096
        assert ckpt.tokenizer.kind == "spm" and ckpt.tokenizer.bos_id == 1 and ckpt.tokenizer.add_bos
        seq = ckpt.tokenizer.encode(PROBE, bos=True)
        torch.testing.assert_close(camelid_logits(folder, seq), hf_logits(tmp_path / "hf", seq), atol=2e-4, rtol=1e-4)


# --- tokenizers against their own libraries ---


def test_tiktoken_file_matches_tiktoken(llama3_setup):
    tiktoken = pytest.importorskip("tiktoken")
    s = llama3_setup
    ours = read_tiktoken_tokenizer(s)
    base = len(s["ranks"])
    specials = {name: base + i for i, name in enumerate(llama3_special_tokens())}
    theirs = tiktoken.Encoding("tiny-llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=s["ranks"], special_tokens=specials)
    for text in [PROBE, *TEXT, "  leading spaces\n\n\nand   gaps\r\n", "<|eot_id|> typed by a user"]:
        expected = theirs.encode(text, disallowed_special=())
        assert ours.encode(text) == expected
        assert ours.decode(expected) == text
    assert ours.encode("<|start_header_id|>user<|end_header_id|>", special=True)[0] == base + 6
    assert ours.bos_id == base and ours.eos_id == base + 1
    assert {base + 9, base + 8, base + 1} <= ours.stop_ids  # eot, eom, end_of_text


def test_llama3_chat_format_is_builtin(llama3_setup):
    from camelid import chat

    ours = read_tiktoken_tokenizer(llama3_setup)
    assert chat.template_for(ours)[1] == "built-in llama-3"
    ids = chat.encode_chat(ours, [{"role": "user", "content": "hi"}])
    base = len(llama3_setup["ranks"])
    assert ids[:2] == [base, base + 6]  # <|begin_of_text|><|start_header_id|>


def test_sentencepiece_model_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from camelid.formats.tokenizers_io import from_sentencepiece

    model_file = train_sentencepiece(tmp_path)
    ours = from_sentencepiece(model_file)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for text in [PROBE, *TEXT]:
        assert ours.encode(text) == sp.encode(text)
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))


# --- the one Q/K permutation, both ways ---


def test_layout_round_trip():
    for heads, rows_per_head in [(4, 16), (2, 8), (8, 128)]:
        w = torch.randn(heads * rows_per_head, 24)
        assert torch.equal(half_to_interleaved(interleaved_to_half(w, heads), heads), w)
        assert torch.equal(interleaved_to_half(half_to_interleaved(w, heads), heads), w)
        assert not torch.equal(interleaved_to_half(w, heads), w)


def test_layout_equivalence_with_matching_rope():
    """Meta's complex (interleaved) RoPE on Meta-layout weights gives the same attention scores as
    transformers' rotate-half RoPE on the converted weights."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    T, E, theta = 12, 16, 10000.0
    x = torch.randn(T, DIM, dtype=torch.float64)
    wq_half, wk_half = torch.randn(N_HEADS * E, DIM, dtype=torch.float64), torch.randn(N_KV * E, DIM, dtype=torch.float64)
    inv_freq = 1.0 / theta ** (torch.arange(0, E, 2, dtype=torch.float64) / E)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # [T, E/2]

    # Meta: interleaved pairs as complex numbers
    def meta_rope(w, heads):
        v = (x @ w.T).view(T, heads, E // 2, 2)
        rotated = torch.view_as_complex(v.contiguous()) * torch.polar(torch.ones_like(angles), angles)[:, None, :]
        return torch.view_as_real(rotated).reshape(T, heads, E)

    q_meta = meta_rope(half_to_interleaved(wq_half, N_HEADS), N_HEADS)
    k_meta = meta_rope(half_to_interleaved(wk_half, N_KV), N_KV)
    # transformers: rotate-half on [B, H, T, E]
    emb = torch.cat([angles, angles], dim=-1)[None]
    q_hf, k_hf = apply_rotary_pos_emb((x @ wq_half.T).view(1, T, N_HEADS, E).transpose(1, 2),
                                      (x @ wk_half.T).view(1, T, N_KV, E).transpose(1, 2), emb.cos(), emb.sin())
    rep = N_HEADS // N_KV
    scores_meta = torch.einsum("thd,shd->hts", q_meta, k_meta.repeat_interleave(rep, dim=1))
    scores_hf = torch.einsum("htd,hsd->hts", q_hf[0], k_hf[0].repeat_interleave(rep, dim=0))
    torch.testing.assert_close(scores_meta, scores_hf)


# --- bad input ---


def test_missing_shard(llama3_setup):
    s = llama3_setup
    folder = write_meta(s["tmp"] / "gap", split(meta_state(s["model"]), 3, True)[:1], s["params"], s["tiktoken"])
    torch.save({}, folder / "consolidated.02.pth")
    with pytest.raises(FormatError, match=r"consolidated\.01\.pth is missing"):
        read(folder)


def test_shards_that_do_not_fit(llama3_setup):
    s = llama3_setup
    shards = split(meta_state(s["model"]), 2, True)
    shards[1]["layers.0.attention.wo.weight"] = shards[1]["layers.0.attention.wo.weight"][:-1]
    with pytest.raises(FormatError, match="layers.0.attention.wo.weight shards do not fit"):
        read(write_meta(s["tmp"] / "misfit", shards, s["params"], s["tiktoken"]))


def test_params_that_do_not_match_weights(llama3_setup):
    s = llama3_setup
    params = {**s["params"], "multiple_of": 256}  # FFN size 256 instead of the stored 192
    ckpt = read(write_meta(s["tmp"] / "badparams", split(meta_state(s["model"]), 1, True), params, s["tiktoken"]))
    with pytest.raises(FormatError, match="feed_forward.w1.weight has shape"):
        build_model(ckpt)


class _Payload:
    """Unpickling this would call open(marker, "w"): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_never_runs(tmp_path, llama3_setup):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4), "payload": _Payload(marker)}, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(llama3_setup["params"]))
    (folder / "tokenizer.model").write_bytes(llama3_setup["tiktoken"].read_bytes())
    with pytest.raises(FormatError, match="refusing to unpickle"):
        read(folder)
    assert not marker.exists()


def test_pickle_that_is_not_weights(tmp_path, llama3_setup):
    folder = tmp_path / "list"
    folder.mkdir()
    torch.save([torch.zeros(2)], folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(llama3_setup["params"]))
    with pytest.raises(FormatError, match="not a dict of named tensors"):
        read(folder)


def test_params_without_weights(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(FormatError, match="params.json but no consolidated"):
        read(tmp_path)


def test_weights_without_tokenizer(llama3_setup):
    s = llama3_setup
    folder = write_meta(s["tmp"] / "notok", split(meta_state(s["model"]), 1, True), s["params"], s["tiktoken"])
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FormatError, match="no tokenizer.model"):
        read(folder)


# --- the same weights in every format ---


def write_gguf(path: Path, model, tokenizer, params: dict) -> Path:
    """The weights as an F32 GGUF (llama.cpp's names, Q/K rows interleaved), with the tiktoken vocabulary."""
    import numpy as np
    from gguf import GGUFWriter

    from camelid.formats.gguf import gguf_name
    from camelid.model import rope_frequencies

    cfg = model.config
    vocab = json.loads(tokenizer.backend.to_str())["model"]
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(params["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    names = [tokenizer.backend.id_to_token(i) for i in range(tokenizer.vocab_size)]
    w.add_token_list(names)
    w.add_token_types([3 if i in tokenizer.special_ids else 1 for i in range(len(names))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_add_bos_token(True)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    scaling = RopeScaling(factor=8.0)  # what use_scaled_rope means; GGUF stores it as per-frequency divisors
    plain = rope_frequencies(head_dim, params["rope_theta"], None)
    w.add_tensor("rope_freqs.weight", (plain / rope_frequencies(head_dim, params["rope_theta"], scaling)).numpy())
    for name, t in meta_state(model).items():
        w.add_tensor(gguf_name(name), np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_same_weights_same_logits_in_every_format(llama3_setup, ids):
    """HF folder, 2-shard Meta checkpoint and GGUF of the same weights: bit-identical camelid logits,
    all equal to transformers' on the HF folder; the GGUF and tiktoken vocabularies tokenize alike."""
    s = llama3_setup
    meta_folder = write_meta(s["tmp"] / "same-meta", split(meta_state(s["model"]), 2, True), s["params"], s["tiktoken"])
    gguf_file = write_gguf(s["tmp"] / "same.gguf", s["model"], read_tiktoken_tokenizer(s), s["params"])
    hf_folder = s["tmp"] / "hf"
    (hf_folder / "tokenizer.json").write_text(read_tiktoken_tokenizer(s).backend.to_str())
    outs = {p.name: camelid_logits(p, ids) for p in (hf_folder, meta_folder, gguf_file)}
    assert read(gguf_file).format == "gguf" and read(meta_folder).format == "meta" and read(hf_folder).format == "hf"
    first = outs["hf"]
    for name, out in outs.items():
        assert torch.equal(out, first), name
    torch.testing.assert_close(first, hf_logits(hf_folder, ids), atol=2e-4, rtol=1e-4)
    from_gguf = read(gguf_file).tokenizer
    assert from_gguf.encode(PROBE, bos=True) == read_tiktoken_tokenizer(s).encode(PROBE, bos=True)


def test_original_subfolder(llama3_setup):
    """A download whose Meta checkpoint sits in original/ is found from the folder above."""
    s = llama3_setup
    top = s["tmp"] / "download"
    write_meta(top / "original", split(meta_state(s["model"]), 1, True), s["params"], s["tiktoken"])
    ckpt = read(top)
    assert ckpt.format == "meta" and ckpt.info["format_reason"].endswith("in original/")
