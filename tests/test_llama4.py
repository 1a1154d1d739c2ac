"""Llama 4 text models against transformers' Llama4ForCausalLM / Llama4ForConditionalGeneration (eager, float32).

Tiny random models (tests/llama4_factory.py): hidden 64, 4/2 heads of 16, 8 layers, 4 experts top-1, chunk 16,
floor_scale 8, so chunked attention (RoPE layers) and attention temperature (NoPE layers 3 and 7) both act within
the 48-token prompt. Each variant is saved with save_pretrained and read back by camelid from the folder.
"""

from __future__ import annotations

import math

import pytest
import torch

from camelid.formats import read
from camelid.generate import Request, generate
from camelid.loader import build_model

transformers = pytest.importorskip("transformers")
import llama4_factory as F  # noqa: E402

N_TOKENS = 48
VARIANTS = {
    "step1-qk": {},
    "step1-noqk": {"use_qk_norm": False},
    "step2-qk": {"interleave_moe_layer_step": 2},
    "step2-noqk": {"interleave_moe_layer_step": 2, "use_qk_norm": False},
    "scout-rope": {"rope_parameters": F.SCOUT_ROPE},
    "dense": {"moe_layers": [], "no_rope_layers": [1] * 8, "layer_types": ["full_attention"] * 8},
    "no-temperature": {"attn_temperature_tuning": False},
}


def prompt_ids(n: int = N_TOKENS, seed: int = 1, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """variant -> (transformers model, folder)"""
    root = tmp_path_factory.mktemp("llama4")
    tok = F.train_tokenizer()
    out = {}
    for name, over in VARIANTS.items():
        model = F.causal_lm(**over)
        out[name] = (model, F.save(model, root / name, tok))
    return out


def ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[0, :-1].double(), -1)
    return math.exp(-logp.gather(1, ids[0, 1:, None]).mean().item())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(folders, variant):
    ref_model, folder = folders[variant]
    ids = prompt_ids()
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
    model = build_model(read(folder))
    got = model(ids)
    assert (got - ref).abs().max().item() < 1e-4
    assert abs(ppl(got, ids) / ppl(ref, ids) - 1) < 1e-4


def test_config_knobs_are_read(folders):
    cfg = read(folders["step2-qk"][1]).config
    assert cfg.arch == "llama4" and cfg.n_experts == 4 and cfg.n_experts_used == 1
    assert cfg.moe_layers == (1, 3, 5, 7) and cfg.nope_layers == (3, 7)
    assert cfg.chunked_layers == (0, 1, 2, 4, 5, 6) and cfg.attention_chunk_size == 16
    assert cfg.qk_norm and cfg.attn_temperature_tuning and cfg.floor_scale == 8
    dense = read(folders["dense"][1]).config
    assert dense.moe_layers == () and dense.nope_layers == () and dense.chunked_layers == ()


def test_each_feature_changes_the_logits(folders):
    """The reference comparison is only worth something if chunking, temperature and routing all act here."""
    import dataclasses

    ckpt = read(folders["step1-qk"][1])
    ids = prompt_ids()
    base = build_model(ckpt)(ids)
    for change in ({"chunked_layers": ()}, {"attn_temperature_tuning": False}, {"qk_norm": False}, {"nope_layers": ()}):
        ckpt.config = dataclasses.replace(read(folders["step1-qk"][1]).config, **change)
        assert (build_model(ckpt)(ids) - base).abs().max() > 1e-3, change


def _greedy(model, prompts, n):
    outs = [[] for _ in prompts]
    for step in generate(model, [Request(p, n) for p in prompts]):
        for b, t in enumerate(step):
            if t is not None:
                outs[b].append(t)
    return outs


@pytest.mark.slow
def test_decode_across_chunks_equals_one_pass(folders):
    """40 greedy tokens decoded one by one (crossing chunk boundaries 16, 32, 48) equal the argmax of one full
    pass over the result, alone and batched beside a longer prompt."""
    model = build_model(read(folders["step2-noqk"][1]))
    short, long = prompt_ids(10, seed=2)[0].tolist(), prompt_ids(21, seed=3)[0].tolist()
    alone = _greedy(model, [short], 40)[0]
    full = model(torch.tensor([short + alone]))[0]
    assert full[len(short) - 1:-1].argmax(-1).tolist() == alone
    batched = _greedy(model, [long, short], 40)
    assert batched[1] == alone
    full = model(torch.tensor([long + batched[0]]))[0]
    assert full[len(long) - 1:-1].argmax(-1).tolist() == batched[0]


def test_conditional_generation_folder(tmp_path):
    ref_model = F.conditional_generation(interleave_moe_layer_step=2)
    folder = F.save(ref_model, tmp_path / "cg")
    ids = prompt_ids()
    with torch.no_grad():
        # the text model of the very same weights (transformers 5's ConditionalGeneration forward fails on text only)
        ref = ref_model.language_model(input_ids=ids).logits.float()
    ckpt = read(folder)
    assert "vision_tower" in ckpt.info and ckpt.info["vision_tower"].startswith("skipped")
    got = build_model(ckpt)(ids)
    assert (got - ref).abs().max().item() < 1e-4


def test_hub_style_config(tmp_path):
    """Configs as the hub has them: classic rope_theta/rope_scaling keys, Meta's attn_temperature_tuning: 4, no
    derived lists (moe_layers, layer_types), an empty no_rope_layers."""
    ref_model = F.causal_lm(rope_parameters=F.SCOUT_ROPE)
    folder = F.save(ref_model, tmp_path / "hub")

    def hub(cfg):
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params
        cfg["attn_temperature_tuning"] = 4
        cfg["no_rope_layers"] = []
        for key in ("moe_layers", "layer_types"):
            cfg.pop(key, None)

    F.edit_config(folder, hub)
    ids = prompt_ids()
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
    got = build_model(read(folder))(ids)
    assert (got - ref).abs().max().item() < 1e-4


def test_param_counts(folders):
    ref, folder = folders["step2-qk"]
    cfg = read(folder).config
    assert cfg.param_count() == sum(p.numel() for p in ref.parameters())
    routed = sum(p.numel() for n, p in ref.named_parameters() if ".experts." in n)
    assert cfg.param_count(active=True) == cfg.param_count() - routed * (cfg.n_experts - 1) // cfg.n_experts


def test_info_and_quantize_cli(tmp_path):
    from conftest import camelid_cli, one_line_error

    folder = F.save(F.conditional_generation(interleave_moe_layer_step=2), tmp_path / "cg")
    r = camelid_cli("info", str(folder))
    assert r.returncode == 0, r.stderr
    rows = dict(line.split(None, 1) if "  " not in line else [s.strip() for s in line.split("  ", 1)]
                for line in r.stdout.splitlines() if line.strip())
    assert rows["architecture"] == "llama4 (Llama4ForConditionalGeneration)"
    assert rows["experts"].startswith("4 routed (top-1, dim 48) + 1 shared, on layers 1,3,5,7")
    assert rows["layer pattern"].startswith("DcMcDcMnDcMcDcMn")
    assert rows["vision tower"].startswith("skipped: ")
    assert "active parameters" in rows and "<|eot|>" in rows["stop tokens"]
    r = camelid_cli("quantize", str(folder), "--to", "int8", "--out", str(tmp_path / "x"))
    assert "written as GGUF only" in one_line_error(r)
    r = camelid_cli("quantize", str(folder), "--to", "q8_0", "--out", str(tmp_path / "m.gguf"), "--no-eval")
    assert r.returncode == 0, r.stderr
    assert read(tmp_path / "m.gguf").config.moe_layers == (1, 3, 5, 7)


def test_chunked_layers_keep_one_chunk_of_kv(folders):
    """Chunked layers hold attention_chunk_size KV slots, NoPE layers all positions; prompts fed in pieces that
    straddle chunk boundaries (5, 13, 30 tokens) give the logits of one whole pass."""
    from camelid.cache import KVCache

    model = build_model(read(folders["step1-qk"][1]))
    cache = KVCache.for_model(model, 1, 200)
    assert [cache.k[i].shape[2] for i in range(8)] == [16, 16, 16, 200, 16, 16, 16, 200]
    ids = prompt_ids()
    whole = model(ids)
    cache = KVCache.for_model(model, 1, 48)
    parts, start = [], 0
    for n in (5, 13, 30):
        parts.append(model(ids[:, start:start + n], torch.arange(start, start + n)[None], cache))
        start += n
    assert (torch.cat(parts, 1) - whole).abs().max().item() < 1e-4
