"""`camelid export`: merged GGUF / HF outputs and the GGUF LoRA file, checked against independent peers.

A tiny random GGUF base (tests/gguf_factory.py) and a random adapter with non-zero B on all 7 targets (so a Q/K
row-order mistake shows). Peers: llama.cpp (the merged GGUF; the GGUF LoRA applied unmerged with lora_path),
transformers (the merged HF folder) and peft (the base HF folder with the peft adapter folder applied), and an
unmerged camelid forward (forward hooks adding scale * B (A x)), which shares no code with the merge.
"""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from conftest import require_llama_cpp
from gguf import GGMLQuantizationType as GQ
from gguf_factory import Spec, byte_level_vocab, write_gguf

import camelid
from camelid.cli import main
from camelid.errors import FormatError
from camelid.formats import read
from camelid.formats.merge import merge
from camelid.formats.peft import TARGETS, Adapter, write_adapter
from camelid.loader import build_model

SPEC = Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, context_length=128)
IDS = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101, 32, 99, 97, 116]


def vocab_with_merges():
    v = byte_level_vocab()
    v.merges = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t"]
    v.tokens += ["Ġt", "he", "Ġthe", "Ġc", "at"]
    v.types += [1] * 5
    return v


def random_adapter(spec: Spec, r: int = 4, alpha: float = 8.0, rslora: bool = False, seed: int = 0,
                   in_dim: int | None = None) -> Adapter:
    """Random A and non-zero B on every block linear; scale * B @ A is about as large as W."""
    g = torch.Generator().manual_seed(seed)
    kv = spec.n_kv_heads * spec.head_dim
    shapes = {"q": (spec.dim, spec.dim), "k": (kv, spec.dim), "v": (kv, spec.dim), "o": (spec.dim, spec.dim),
              "gate": (spec.hidden_dim, spec.dim), "up": (spec.hidden_dim, spec.dim), "down": (spec.dim, spec.hidden_dim)}
    pairs = {}
    for i in range(spec.n_layers):
        for short, (out, inp) in shapes.items():
            inp = in_dim or inp
            a = torch.randn(r, inp, generator=g) / math.sqrt(inp)
            b = torch.randn(out, r, generator=g) * 0.2
            pairs[f"layers.{i}.{TARGETS[short][0]}"] = (a, b)
    return Adapter(r=r, alpha=alpha, pairs=pairs, use_rslora=rslora)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny.gguf"
    write_gguf(path, SPEC, vocab_with_merges(), GQ.F32, chat_template="{{ messages[0]['content'] }}")
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return write_adapter(random_adapter(SPEC), tmp_path_factory.mktemp("adapter") / "lora")


def camelid_logits(ckpt, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return build_model(ckpt)(torch.tensor([ids]))[0].numpy()


def unmerged_logits(base_path, adapter: Adapter, ids=IDS) -> np.ndarray:
    """camelid's base model with the adapter applied unmerged, by forward hooks: y = W x + scale * B (A x)."""
    model = build_model(read(base_path))
    for module, (a, b) in adapter.pairs.items():
        def hook(_mod, inputs, output, a=a, b=b):
            return output + adapter.scale * (inputs[0] @ a.T) @ b.T
        model.get_submodule(module).register_forward_hook(hook)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def llama(path, lora=None):
    llama_cpp = require_llama_cpp()
    kw = {"lora_path": str(lora)} if lora else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1, seed=0, **kw)


def llama_logits(llm, ids=IDS) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- merging ------------------------------------------------------------------------------------------


def test_merge_equals_unmerged_forward(base, adapter_dir):
    from camelid.formats.peft import read_adapter

    adapter = read_adapter(adapter_dir)
    src = read(base)
    merged = merge(src, adapter)
    assert merged.tensors["layers.0.attention.wq.weight"].dtype == "F32"
    untouched = [n for n in src.tensors if n.removesuffix(".weight") not in adapter.pairs]
    assert len(untouched) == 2 + 2 * SPEC.n_layers + 1  # embedding, output, final norm, two norms per block
    assert all(merged.tensors[n] is src.tensors[n] for n in untouched)
    assert src.tensors["layers.0.attention.wq.weight"].dtype == "F32" and merged.tensors is not src.tensors
    ours, ref = camelid_logits(merged), unmerged_logits(base, adapter)
    assert rel(ours, ref) < 1e-5
    assert rel(camelid_logits(read(base)), ref) > 0.1  # the adapter changes the model a lot: a wrong merge shows


def test_adapter_for_another_base_is_one_line(tmp_path, base, capsys):
    bad = write_adapter(random_adapter(SPEC, in_dim=32), tmp_path / "other")
    with pytest.raises(FormatError, match=r"layers\.0\.attention\.wq is \[64, 64\].*\[64, 32\]"):
        camelid.export(base, bad, "gguf", tmp_path / "x.gguf")
    assert main(["export", str(base), "--adapter", str(bad), "--to", "hf", "--out", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("camelid: error: adapter made for another base") and err.count("\n") == 1
    assert "layers.0.attention.wq" in err and "[64, 64]" in err and "[64, 32]" in err
    assert not (tmp_path / "h").exists() and not (tmp_path / "x.gguf").exists()
    deeper = random_adapter(Spec(**{**SPEC.__dict__, "n_layers": 3}))
    with pytest.raises(FormatError, match="layers.2.attention.wq, which the base model"):
        camelid.export(base, deeper, "gguf-lora", tmp_path / "y.gguf")


def test_cli_errors(tmp_path, base, adapter_dir, capsys):
    assert main(["export", str(base), "--to", "onnx", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--to must be one of gguf, hf, gguf-lora" in err and err.count("\n") == 1
    assert main(["export", str(base), "--to", "hf", "--type", "q4_0", "--out", str(tmp_path / "x")]) == 1
    assert "--type for hf must be one of f32, f16, bf16" in capsys.readouterr().err
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep me")
    assert main(["export", str(base), "--adapter", str(adapter_dir), "--to", "gguf", "--out", str(existing)]) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and err.count("\n") == 1
    assert existing.read_bytes() == b"keep me"
    assert main(["export", str(base), "--to", "gguf-lora", "--out", str(tmp_path / "l.gguf")]) == 1
    assert "--adapter" in capsys.readouterr().err
    assert main(["export", str(base), "--to", "gguf", "--out", str(base), "--force"]) == 1
    assert "source model itself" in capsys.readouterr().err
    assert main(["export", str(base), "--adapter", str(adapter_dir), "--to", "gguf", "--out", str(existing),
                 "--force", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["type"] == "F16" and existing.read_bytes()[:4] == b"GGUF"
    n = len(read(base).tensors)
    assert f"writing gguf: 100.0% {n} tensors / {n} tensors" in captured.err  # the progress bar's last line
    lora = tmp_path / "a.gguf"
    assert main(["export", str(base), "--adapter", str(adapter_dir), "--to", "gguf-lora", "--out", str(lora)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {lora} (gguf-lora F32") and "writing gguf-lora: 100.0%" in captured.err


def test_tied_base_to_hf_in_transformers(tmp_path):
    """A tied output layer (as SmolLM2's) is not stored; transformers ties it and gives camelid's logits."""
    transformers = pytest.importorskip("transformers")
    spec = Spec(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128, tied=True)
    src = tmp_path / "tied.gguf"
    write_gguf(src, spec, vocab_with_merges())
    adapter = random_adapter(spec, seed=5)
    camelid.export(src, adapter, "hf", tmp_path / "hf", type="f32")
    from safetensors import safe_open

    assert "lm_head.weight" not in safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt").keys()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([IDS])).logits[0].numpy()
    assert rel(theirs, unmerged_logits(src, adapter)) < 1e-5


# --- merged GGUF in llama.cpp -------------------------------------------------------------------------


@pytest.mark.parametrize("kind,tol", [("f16", 0.005), ("q8_0", 0.04)])
def test_merged_gguf_in_llama_cpp(tmp_path, base, adapter_dir, kind, tol):
    """llama.cpp on the merged file gives camelid's merged model's logits (tolerances as test_quantize's)."""
    out = tmp_path / f"merged-{kind}.gguf"
    summary = camelid.export(base, adapter_dir, "gguf", out, type=kind)
    assert summary["type"] == kind.upper() and gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    from camelid.formats.peft import read_adapter

    theirs = llama_logits(llama(out))
    ours = unmerged_logits(base, read_adapter(adapter_dir))
    assert rel(theirs, ours) < tol
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
    assert rel(camelid_logits(read(out)), ours) < tol


# --- the GGUF LoRA file in llama.cpp ------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_gguf_lora_applied_by_llama_cpp(tmp_path, base, rslora):
    adapter = random_adapter(SPEC, rslora=rslora, seed=3)
    lora = tmp_path / "lora.gguf"
    summary = camelid.export(base, adapter, "gguf-lora", lora)
    r = gguf.GGUFReader(lora)
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(adapter.scale * adapter.r)
    names = {t.name: t for t in r.tensors}
    assert len(names) == 2 * 7 * SPEC.n_layers and summary["tensors"] == len(names)
    a, b = names["blk.0.attn_k.weight.lora_a"], names["blk.0.attn_k.weight.lora_b"]
    assert list(a.shape) == [SPEC.dim, 4] and list(b.shape) == [4, SPEC.n_kv_heads * SPEC.head_dim]  # ggml ne order
    merged = tmp_path / "merged-f32.gguf"
    camelid.export(base, adapter, "gguf", merged, type="f32")

    with_lora = llama_logits(llama(base, lora=lora))
    on_merged = llama_logits(llama(merged))
    ours = unmerged_logits(base, adapter)
    # llama.cpp keeps its KV cache in f16: hence the tolerance (test_quantize's for f16 files)
    assert rel(on_merged, ours) < 0.005
    assert rel(with_lora, on_merged) < 0.005
    assert rel(with_lora, ours) < 0.005
    assert rel(llama_logits(llama(base)), ours) > 0.1  # the adapter matters, so a Q/K row-order error would show


# --- merged HF folder in transformers -----------------------------------------------------------------


def test_merged_hf_folder_in_transformers_and_peft(tmp_path, base, adapter_dir):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from camelid.formats.peft import read_adapter

    merged_dir, base_dir = tmp_path / "merged", tmp_path / "base-hf"
    assert camelid.export(base, adapter_dir, "hf", merged_dir)["type"] == "float32"  # an F32 source stays float32
    camelid.export(base, None, "hf", base_dir)
    cfg = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]

    ids = torch.tensor([IDS])
    model = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(ids).logits[0].numpy()
    ours = unmerged_logits(base, read_adapter(adapter_dir))
    assert rel(theirs, ours) < 1e-5
    base_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with_peft = peft.PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    with torch.no_grad():
        unmerged = with_peft(ids).logits[0].numpy()
    assert rel(theirs, unmerged) < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(merged_dir)
    text = "Hello world! The cat"
    assert tok(text)["input_ids"] == read(base).tokenizer.encode(text, bos=True)
    assert read(merged_dir).tokenizer.encode(text, bos=True) == read(base).tokenizer.encode(text, bos=True)


def test_write_hf_folder_from_a_state_dict(tmp_path, base):
    """The fully fine-tuned path: a state dict in camelid names written into a run's folder, in bf16 shards,
    read back by camelid and transformers; the run's other files stay, a second write leaves no stale shard."""
    from camelid.formats.hf_write import write_hf_folder

    ckpt = read(base)
    state = {k: v.clone() for k, v in build_model(ckpt).state_dict().items()}
    state["layers.1.attention.wk.weight"] *= -2.0  # "fine-tuned"
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    wrapped = {k.replace("layers.0.", "layers.0._checkpoint_wrapped_module."): v for k, v in state.items()}
    summary = write_hf_folder(ckpt, wrapped, run, "bf16", shard_bytes=20_000)
    assert summary["type"] == "bfloat16" and summary["shards"] > 3
    files = sorted(f.name for f in run.glob("*.safetensors"))
    assert len(files) == summary["shards"] and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((run / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files) and len(index["weight_map"]) == len(ckpt.tensors)
    assert (run / "checkpoint").is_dir() and (run / "metrics.jsonl").read_text() == "{}\n"
    back = read(run)
    assert back.config == ckpt.config
    w = back.tensors["layers.1.attention.wk.weight"].load()
    torch.testing.assert_close(w.float(), state["layers.1.attention.wk.weight"].to(torch.bfloat16).float())
    transformers = pytest.importorskip("transformers")  # the sharded folder loads in transformers too
    model = transformers.AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([IDS])).logits[0].numpy()
    assert rel(theirs, camelid_logits(back)) < 1e-5

    only_trained = {"layers.0.feed_forward.w2.weight": state["layers.0.feed_forward.w2.weight"] * 0.5}
    write_hf_folder(ckpt, only_trained, run, "f32")  # one file now; the rest of the weights are the base's
    assert sorted(f.name for f in run.glob("model*")) == ["model.safetensors"]
    again = read(run)
    torch.testing.assert_close(again.tensors["layers.0.feed_forward.w2.weight"].load(), only_trained["layers.0.feed_forward.w2.weight"])
    torch.testing.assert_close(again.tensors["layers.1.attention.wk.weight"].load(), ckpt.tensors["layers.1.attention.wk.weight"].load())

    with pytest.raises(ValueError, match="float type"):
        write_hf_folder(ckpt, state, tmp_path / "other", "q4_0")
    with pytest.raises(ValueError, match="'layers.0.attention.wq.lora_A' is not a weight of the base"):
        write_hf_folder(ckpt, {"layers.0.attention.wq.lora_A": state["norm.weight"]}, tmp_path / "other")
    with pytest.raises(ValueError, match=r"norm.weight is \[3\], the base's is \[64\]"):
        write_hf_folder(ckpt, {"norm.weight": torch.ones(3)}, tmp_path / "other")
    assert not (tmp_path / "other").exists()


# --- the real default model (Q4_1 GGUF, tied embeddings) -----------------------------------------------


def default_adapter(ckpt, r: int = 4, seed: int = 0) -> Adapter:
    """A random adapter over every block linear of `ckpt`, small enough that the model still speaks."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, t in ckpt.tensors.items():
        module = name.removesuffix(".weight")
        if module.split(".", 2)[-1] in {cam for cam, _ in TARGETS.values()}:
            out, inp = t.shape
            pairs[module] = (torch.randn(r, inp, generator=g) / math.sqrt(inp), torch.randn(out, r, generator=g) * 0.03)
    return Adapter(r=r, alpha=2.0 * r, pairs=pairs)


@pytest.mark.slow
def test_default_model_exports(tmp_path, default_model_path):
    transformers = pytest.importorskip("transformers")
    ckpt = read(default_model_path)
    adapter = default_adapter(ckpt)
    assert len(adapter.pairs) == 7 * ckpt.config.n_layers
    text = "The capital of France is"
    ids = ckpt.tokenizer.encode(text, bos=True)
    ours = unmerged_logits(default_model_path, adapter, ids)
    assert rel(camelid_logits(ckpt, ids), ours) > 0.01  # the adapter changes the logits

    folder = tmp_path / "smol-hf"
    camelid.export(ckpt, adapter, "hf", folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert rel(theirs, ours) < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok(text)["input_ids"] == ids
    messages = [{"role": "user", "content": "Hi there"}]
    llm = camelid.LLM(build_model(ckpt), ckpt)
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        ckpt.tokenizer.decode(llm.encode_chat(messages), special=True)
    del model

    lora = tmp_path / "smol-lora.gguf"
    camelid.export(ckpt, adapter, "gguf-lora", lora)
    base_llm = llama(default_model_path)
    with_lora, plain = llama_logits(llama(default_model_path, lora=lora), ids), llama_logits(base_llm, ids)
    assert (with_lora.argmax(-1) == ours.argmax(-1)).mean() >= 0.8
    assert rel(with_lora, ours) < 0.1
    # the adapter's effect as llama.cpp applies it is camelid's (the quantization noise of both mostly cancels)
    effect = np.corrcoef((with_lora - plain).ravel(), (ours - camelid_logits(ckpt, ids)).ravel())[0, 1]
    assert effect > 0.8
    merged = tmp_path / "smol-merged-q8_0.gguf"
    camelid.export(ckpt, adapter, "gguf", merged, type="q8_0")
    on_merged = llama_logits(llama(merged), ids)
    assert (on_merged.argmax(-1) == ours.argmax(-1)).mean() >= 0.8 and rel(on_merged, ours) < 0.1
    print(f"correlation of the adapter's effect {effect:.4f}; "
          f"rel. max logit difference: llama.cpp Q4_1 base + GGUF LoRA {rel(with_lora, ours):.4f}, "
          f"llama.cpp merged Q8_0 {rel(on_merged, ours):.4f}, transformers merged HF {rel(theirs, ours):.2e}")
