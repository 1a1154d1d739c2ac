"""Tiny random Llama 4 text models built with transformers (seed 0), saved as Hugging Face folders.

hidden 64, 4 query / 2 KV heads of 16, 8 layers, 4 experts top-1, chunk 16 and floor_scale 8 so chunked attention
and the NoPE layers' temperature both act within a 48-token prompt. Weights are drawn larger than transformers'
init so that every part (router, experts, shared expert, norms) shows in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>",
            "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
TEXT = [
    "The quick brown fox jumps over the lazy dog while the camel waits by the well.",
    "Llamas and alpacas are camelids; they live in the Andes and carry loads for farmers.",
    "In 1983, 42 engineers wrote 7 compilers, 19 editors and 3 operating systems.",
    "Ünïcödé text: naïve café, résumé, Straße, 東京, and emoji 🐪🦙 should survive a round trip.",
    "def add(a, b):\n    return a + b  # a tiny function\n\nprint(add(2, 3))",
    "She said: 'It's fine, we'll see; they're here and I'm ready.' He didn't reply. HTTPServer's URLs/paths",
    "Mixture of experts routes each token to one expert; the shared expert sees every token.",
]
SCOUT_ROPE = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def train_tokenizer(vocab_size: int = 300):
    """A byte-level BPE with Llama 4's pre-tokenizer split rules and its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from camelid.tokenizer import byte_level_pre_tokenizer

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = byte_level_pre_tokenizer("llama4")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return tok


def text_config(vocab_size: int = 320, **over):
    import transformers

    base = dict(hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab_size,
                num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True,
                attention_chunk_size=16, floor_scale=8, attn_scale=0.1, attn_temperature_tuning=True,
                max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=4, pad_token_id=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    base.update(over)
    return transformers.Llama4TextConfig(**base)


def randomize(model, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "router" in name:
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.15)
    return model


def causal_lm(seed: int = 0, **over):
    import transformers

    cfg = text_config(**over)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(transformers.Llama4ForCausalLM(cfg).eval(), seed)


def conditional_generation(seed: int = 0, **over):
    """Llama4ForConditionalGeneration with a tiny vision tower (which camelid skips)."""
    import transformers

    text = text_config(**over)
    vision = transformers.Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, image_size=28, patch_size=14,
                                             vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                                             pixel_shuffle_ratio=0.5)
    cfg = transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision.to_dict())
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(transformers.Llama4ForConditionalGeneration(cfg).eval(), seed)


def save(model, folder: Path, tokenizer=None) -> Path:
    """save_pretrained plus tokenizer.json / tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok = tokenizer or train_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "add_bos_token": True}))
    return folder


def edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
