"""LoRA adapters in peft's format: a folder with adapter_config.json + adapter_model.safetensors.

In camelid an adapter is plain data: for each adapted linear layer (named as the model's module, e.g.
"layers.0.attention.wq") a pair A [r, in], B [out, r], with y = W x + scale * B (A x), scale = alpha / r
(alpha / sqrt(r) with rsLoRA). Rows are in camelid's canonical order, which is Hugging Face's, so the tensors
are peft's as they are; only the names are mapped:

    layers.{i}.attention.wq      <-> base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight (and lora_B)
    layers.{i}.feed_forward.w1   <-> base_model.model.model.layers.{i}.mlp.gate_proj...

The short target names used on the command line are peft's Llama module names without "_proj":
q, k, v, o, gate, up, down.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError

# short target name -> (camelid module suffix, peft module name)
TARGETS = {
    "q": ("attention.wq", "self_attn.q_proj"),
    "k": ("attention.wk", "self_attn.k_proj"),
    "v": ("attention.wv", "self_attn.v_proj"),
    "o": ("attention.wo", "self_attn.o_proj"),
    "gate": ("feed_forward.w1", "mlp.gate_proj"),
    "up": ("feed_forward.w3", "mlp.up_proj"),
    "down": ("feed_forward.w2", "mlp.down_proj"),
}
DEFAULT_TARGETS = tuple(TARGETS)  # every linear layer of the blocks, never the (often tied) output layer
_BY_PEFT = {peft: short for short, (_, peft) in TARGETS.items()}
_BY_CAMELID = {cam: short for short, (cam, _) in TARGETS.items()}
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def parse_targets(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'q,k,v' or ['q_proj', 'gate'] -> ('q', 'k', 'v'); 'all' or None: every block linear. ValueError on unknown names."""
    if spec is None or spec == "all" or spec == ["all"]:
        return DEFAULT_TARGETS
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in names:
        name = raw.strip().removesuffix("_proj")
        if name not in TARGETS:
            raise ValueError(f"unknown LoRA target {raw.strip()!r} (expected some of {', '.join(TARGETS)}, or all)")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("no LoRA targets given")
    return tuple(out)


@dataclass
class Adapter:
    """A LoRA adapter: pairs[module] = (A [r, in], B [out, r]) in float32, module as in the camelid model."""

    r: int
    alpha: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dropout: float = 0.0
    use_rslora: bool = False
    base_model: str | None = None
    extra: dict = field(default_factory=dict)  # other adapter_config.json fields, kept on a round trip

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def targets(self) -> tuple[str, ...]:
        found = {_BY_CAMELID[m.split(".", 2)[2]] for m in self.pairs}
        return tuple(t for t in TARGETS if t in found)

    def delta(self, module: str) -> torch.Tensor:
        """scale * B @ A [out, in]: what merging adds to the module's weight."""
        a, b = self.pairs[module]
        return self.scale * (b.float() @ a.float())

    def check_shapes(self, shapes: dict[str, tuple[int, int]], where: str = "the base model") -> None:
        """FormatError naming the first module whose A/B do not fit shapes[module] = (out, in)."""
        for module, (a, b) in self.pairs.items():
            if module not in shapes:
                raise FormatError(f"adapter for {module}, which {where} does not have (an adapter made for another base?)")
            out, inp = shapes[module]
            if a.shape[1] != inp or b.shape[0] != out:
                raise FormatError(f"adapter made for another base: {module} is [{out}, {inp}] in {where}, the adapter's "
                                  f"B @ A is [{b.shape[0]}, {a.shape[1]}]")


def read_adapter(path: str | os.PathLike) -> Adapter:
    """A peft LoRA folder (or its adapter_model.safetensors) as an Adapter; FormatError with the reason otherwise."""
    from safetensors.torch import load_file

    p = Path(path)
    folder = p.parent if p.is_file() else p
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.exists():
        raise FormatError(f"no such adapter folder: {folder}")
    if not cfg_path.is_file() or not w_path.is_file():
        missing = [f.name for f in (cfg_path, w_path) if not f.is_file()]
        raise FormatError(f"{folder}: not a peft adapter folder (missing {', '.join(missing)})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise FormatError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; camelid reads LoRA adapters")
    for unsupported in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if cfg.get(unsupported):
            raise FormatError(f"{cfg_path}: {unsupported} is not supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise FormatError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (Llama linears have no bias)")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise FormatError(f"{w_path}: cannot read safetensors ({e})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None or m.group(2) not in _BY_PEFT:
            raise FormatError(f"{w_path}: unexpected tensor {key} (camelid reads LoRA on a Llama's block linears)")
        module = f"layers.{m.group(1)}.{TARGETS[_BY_PEFT[m.group(2)]][0]}"
        parts.setdefault(module, {})[m.group(3)] = t.float()
    pairs = {}
    for module, ab in sorted(parts.items(), key=lambda kv: _order(kv[0])):
        if set(ab) != {"A", "B"}:
            raise FormatError(f"{w_path}: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise FormatError(f"{w_path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not make a pair")
        pairs[module] = (a, b)
    if not pairs:
        raise FormatError(f"{w_path}: no LoRA tensors")
    ranks = {a.shape[0] for a, _ in pairs.values()}
    r = int(cfg.get("r", next(iter(ranks))))
    if ranks != {r}:
        raise FormatError(f"{w_path}: ranks {sorted(ranks)} but adapter_config.json says r={r}")
    known = {"r", "lora_alpha", "lora_dropout", "use_rslora", "base_model_name_or_path", "target_modules"}
    return Adapter(r=r, alpha=float(cfg.get("lora_alpha", r)), pairs=pairs, dropout=float(cfg.get("lora_dropout") or 0.0),
                   use_rslora=bool(cfg.get("use_rslora", False)), base_model=cfg.get("base_model_name_or_path"),
                   extra={k: v for k, v in cfg.items() if k not in known})


def _order(module: str) -> tuple[int, int]:
    _, i, rest = module.split(".", 2)
    return int(i), list(_BY_CAMELID).index(rest)


def write_adapter(adapter: Adapter, out: str | os.PathLike) -> Path:
    """Write the adapter as a peft folder (created if needed; files replaced atomically). The folder's path."""
    from safetensors.torch import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in sorted(adapter.pairs.items(), key=lambda kv: _order(kv[0])):
        _, i, rest = module.split(".", 2)
        key = f"base_model.model.model.layers.{i}.{TARGETS[_BY_CAMELID[rest]][1]}"
        tensors[f"{key}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = b.detach().float().contiguous().cpu()
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None, "inference_mode": True,
        "base_model_name_or_path": adapter.base_model, "revision": None,
        "r": adapter.r, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout, "use_rslora": adapter.use_rslora,
        "target_modules": sorted(TARGETS[t][1].split(".")[1] for t in adapter.targets),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        **{k: v for k, v in adapter.extra.items() if k not in ("peft_type", "task_type")},
    }
    tmp_w, tmp_c = folder / f".{WEIGHTS_FILE}.tmp", folder / f".{CONFIG_FILE}.tmp"
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_w, folder / WEIGHTS_FILE)
    os.replace(tmp_c, folder / CONFIG_FILE)
    return folder
