"""LoRA on the model's own linear layers, wrapped in place: y = base(x) + scale * B(A(dropout(x))).

The model is never copied. `apply_lora` replaces each targeted linear module by a `LoRALinear` that holds the
original module as `.base` (frozen) and one or more named adapters (A [r, in], B [out, r] per adapted module).
The base may be a float nn.Linear (the reference path) or one of camelid/quant.py's quantized layers (the fast
path: QLoRA, the weights stay quantized as stored; gradients reach the input through them, see
quant._FrozenQuantMatmul).

On the fast path Q/K/V and gate/up are FUSED into one layer (wqkv, w13). A LoRALinear over a fused layer has
one segment per projection; an adapter's A's of the adapted segments are concatenated into one product and
each segment gets its own B. Adapters, parameter names and checkpoints always use camelid's un-fused module
names ("layers.0.attention.wq"), so the same adapter fits either path. (One difference from peft: dropout, when
training with it, draws one mask per wrapped layer, so fused q/k/v share it; peft draws one per projection.)

Which adapter a forward uses is state, not an argument of the model's forward: every LoRALinear of a model
shares one `LoRAState`; `set_adapter(model, name)` picks one for all rows, `set_adapter_per_row(model, names)`
one per batch row (None: the base alone), so rows with different adapters share one batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FormatError
from ..formats.peft import DEFAULT_TARGETS, TARGETS, Adapter, parse_targets

__all__ = ["DEFAULT_TARGETS", "LoRALinear", "LoRAState", "adapter_from_model", "adapter_names", "apply_lora",
           "load_adapter", "lora_parameters", "merge_into_weights", "module_shapes", "remove_lora", "set_adapter",
           "set_adapter_per_row", "use_adapters"]

DEFAULT = "default"  # the adapter apply_lora trains

# fused fast-path module -> the un-fused modules of its segments, in output order
_FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
          "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


@dataclass
class LoRAState:
    """Which adapter each row uses. `rows` (one name or None per batch row) wins over `active` when set."""

    active: str | None = None
    rows: list[str | None] | None = None
    names: list[str] = field(default_factory=list)  # the adapters on the model, in the order they were added


class LoRAWeights(nn.Module):
    """One adapter on one wrapped layer: A [r, in] and B [out_i, r] for each adapted segment i."""

    def __init__(self, segments: list[int], a: list[torch.Tensor], b: list[torch.Tensor], scale: float,
                 dropout: float = 0.0, trainable: bool = False) -> None:
        super().__init__()
        self.segments = segments  # indices into the LoRALinear's segments
        self.A = nn.ParameterList(nn.Parameter(t, requires_grad=trainable) for t in a)
        self.B = nn.ParameterList(nn.Parameter(t, requires_grad=trainable) for t in b)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = a[0].shape[0]


class LoRALinear(nn.Module):
    """A linear layer (float or quantized, possibly fused) plus named LoRA adapters; the base stays frozen."""

    def __init__(self, base: nn.Module, names: list[str], sizes: list[int], state: LoRAState) -> None:
        super().__init__()
        self.base = base
        self.names = names  # camelid module name of each output segment, e.g. ["layers.0.attention.wq", ...]
        self.sizes = sizes  # output features of each segment
        self.in_features = _in_features(base)
        self.out_features = sum(sizes)
        self.adapters = nn.ModuleDict()
        self.state = state

    def add(self, name: str, weights: LoRAWeights) -> None:
        self.adapters[name] = weights

    def delta(self, x: torch.Tensor, w: LoRAWeights) -> torch.Tensor:
        """scale * B(A(dropout(x))) over all segments [..., out] (zeros in segments this adapter leaves alone)."""
        if len(w.A) == 1 and len(self.sizes) == 1:
            return (w.scale * ((w.dropout(x).to(w.A[0].dtype) @ w.A[0].t()) @ w.B[0].t())).to(x.dtype)
        # a fused layer: one product with every segment's A, one with the B's as a block-diagonal [out, sum r]
        # (zero rows for segments this adapter leaves alone), so two small products instead of one per segment
        a = torch.cat(list(w.A))  # [sum r, in]
        h = w.dropout(x).to(a.dtype) @ a.t()  # [..., sum r]
        blocks, j = [], 0
        for i, size in enumerate(self.sizes):
            if j < len(w.segments) and w.segments[j] == i:
                blocks.append(w.B[j])
                j += 1
            else:
                blocks.append(a.new_zeros(size, 0))
        return (w.scale * (h @ torch.block_diag(*blocks).t())).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows, active = self.state.rows, self.state.active
        if rows is None:
            if active is None or active not in self.adapters:
                return y
            return y + self.delta(x, self.adapters[active])
        if len(rows) != x.shape[0]:
            raise ValueError(f"{len(rows)} per-row adapters set for a batch of {x.shape[0]} rows")
        for name in dict.fromkeys(rows):  # each adapter once, over its rows
            if name is None or name not in self.adapters:
                continue
            idx = [b for b, n in enumerate(rows) if n == name]
            if len(idx) == len(rows):
                return y + self.delta(x, self.adapters[name])
            index = torch.tensor(idx, device=x.device)
            y = y.index_add(0, index, self.delta(x[index], self.adapters[name]))
        return y


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_features  # camelid.quant.Int4Linear / Int8Linear


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, nn.Linear) else module.out_features


def _state(model: nn.Module) -> LoRAState:
    state = getattr(model, "lora_state", None)
    if state is None:
        state = LoRAState()
        model.lora_state = state  # a plain attribute: not a parameter, not in the state dict
    return state


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return model.get_submodule(parent), attr


def _wrappers(model: nn.Module) -> Iterator[LoRALinear]:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            yield m


def module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every module LoRA can adapt, by camelid's un-fused names, on either path."""
    cfg = model.config
    h, k, e, d, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.hidden_dim
    per_layer = {"attention.wq": (h * e, d), "attention.wk": (k * e, d), "attention.wv": (k * e, d),
                 "attention.wo": (d, h * e), "feed_forward.w1": (f, d), "feed_forward.w3": (f, d),
                 "feed_forward.w2": (d, f)}
    return {f"layers.{i}.{m}": s for i in range(cfg.n_layers) for m, s in per_layer.items()}


def _wrap(model: nn.Module, module: str) -> tuple[LoRALinear, int]:
    """The LoRALinear carrying `module` (an un-fused name), wrapping its layer on first use; and its segment."""
    _, layer, suffix = module.split(".", 2)
    prefix = f"layers.{layer}."
    for fused, parts in _FUSED.items():
        if suffix in parts:
            owner, attr = _parent(model, prefix + fused)
            if getattr(owner, attr, None) is not None:  # the fast path fused this projection
                target, names = prefix + fused, [prefix + p for p in parts]
                break
    else:
        target, names = module, [module]
    owner, attr = _parent(model, target)
    layer_module = getattr(owner, attr)
    if isinstance(layer_module, LoRALinear):
        return layer_module, layer_module.names.index(module)
    if layer_module is None:
        raise FormatError(f"the model has no layer {module}")
    shapes = module_shapes(model)
    sizes = [shapes[n][0] for n in names]
    if sum(sizes) != _out_features(layer_module):
        raise FormatError(f"{target} has {_out_features(layer_module)} outputs, expected {sum(sizes)}")
    wrapper = LoRALinear(layer_module, names, sizes, _state(model))
    setattr(owner, attr, wrapper)
    return wrapper, names.index(module)


def _attach(model: nn.Module, name: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
            dropout: float, trainable: bool) -> list[LoRALinear]:
    """Put adapter `name` (pairs by un-fused module name) onto the model's layers; the wrappers touched."""
    by_wrapper: dict[int, tuple[LoRALinear, list[tuple[int, torch.Tensor, torch.Tensor]]]] = {}
    for module, (a, b) in pairs.items():
        wrapper, seg = _wrap(model, module)
        by_wrapper.setdefault(id(wrapper), (wrapper, []))[1].append((seg, a, b))
    device = model.device
    if name not in _state(model).names:
        _state(model).names.append(name)
    for wrapper, segs in by_wrapper.values():
        segs.sort(key=lambda s: s[0])
        wrapper.add(name, LoRAWeights([s for s, _, _ in segs], [a.float().to(device) for _, a, _ in segs],
                                      [b.float().to(device) for _, _, b in segs], scale, dropout, trainable))
    return [w for w, _ in by_wrapper.values()]


def apply_lora(model: nn.Module, targets: str | Sequence[str] = DEFAULT_TARGETS, r: int = 8, alpha: float = 16,
               dropout: float = 0.0, use_rslora: bool = False, seed: int | None = None,
               name: str = DEFAULT) -> list[nn.Module]:
    """Insert a trainable LoRA adapter `name` on `targets` (q,k,v,o,gate,up,down) of every block; the wrapped modules.

    A is kaiming-uniform (a = sqrt 5) as in peft, B zeros, so the fresh adapter changes nothing. Only A and B are
    trainable afterwards (every other parameter is frozen); the adapter is made active. ValueError for unknown
    targets or r < 1. The same seed gives the same A's on the fast and the reference path.
    """
    targets = parse_targets(list(targets) if not isinstance(targets, str) else targets)
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shapes = module_shapes(model)
    pairs = {}
    for i in range(model.config.n_layers):
        for t in targets:
            module = f"layers.{i}.{TARGETS[t][0]}"
            out, inp = shapes[module]
            a = torch.empty(r, inp)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            pairs[module] = (a, torch.zeros(out, r))
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    wrapped = _attach(model, name, pairs, scale, dropout, trainable=True)
    for w in wrapped:
        w.adapters[name].config = {"r": r, "alpha": float(alpha), "dropout": dropout, "use_rslora": use_rslora}
    set_adapter(model, name)
    return wrapped


def lora_parameters(model: nn.Module, name: str = DEFAULT) -> dict[str, nn.Parameter]:
    """Adapter `name`'s parameters by un-fused name: {"layers.0.attention.wq.lora_A": A, "...lora_B": B, ...}."""
    out = {}
    for w in _wrappers(model):
        if name in w.adapters:
            lw = w.adapters[name]
            for j, seg in enumerate(lw.segments):
                out[f"{w.names[seg]}.lora_A"] = lw.A[j]
                out[f"{w.names[seg]}.lora_B"] = lw.B[j]
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(key: str) -> tuple[int, int, str]:
    _, i, rest = key.split(".", 2)
    module = rest.rsplit(".", 1)[0]
    mods = [m for m, _ in TARGETS.values()]
    return int(i), mods.index(module) if module in mods else len(mods), key


def adapter_from_model(model: nn.Module, base_model: str | None = None, name: str = DEFAULT,
                       state: dict[str, torch.Tensor] | None = None) -> Adapter:
    """Adapter `name` of the model (as trained) as plain data, in camelid's un-fused module names.

    state: whole tensors by model.named_parameters() name to use instead of the parameters' own (what the training
    loop gathers from every process under FSDP2, where each process holds only a shard)."""
    params = lora_parameters(model, name)
    if state is not None:
        by_id = {id(p): state[n] for n, p in model.named_parameters() if n in state}
        params = {k: by_id.get(id(p), p) for k, p in params.items()}
    if not params:
        raise ValueError(f"the model has no LoRA adapter {name!r}")
    first = next(w.adapters[name] for w in _wrappers(model) if name in w.adapters)
    cfg = getattr(first, "config", None) or {"r": first.r, "alpha": first.scale * first.r, "dropout": 0.0,
                                             "use_rslora": False}
    pairs = {}
    for key in params:
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            pairs[module] = (params[key].detach().float().cpu().clone(), params[module + ".lora_B"].detach().float().cpu().clone())
    return Adapter(r=cfg["r"], alpha=cfg["alpha"], pairs=pairs, dropout=cfg["dropout"], use_rslora=cfg["use_rslora"],
                   base_model=base_model)


def load_adapter(model: nn.Module, adapter: Adapter, name: str = DEFAULT, activate: bool = True) -> None:
    """Attach a read adapter for inference (frozen, unmerged) under `name`, on either path.

    FormatError saying which shapes differ when the adapter was made for another base; ValueError when `name`
    is taken. With activate, every row uses it until set_adapter / set_adapter_per_row say otherwise.
    """
    adapter.check_shapes(module_shapes(model))
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    wrapped = _attach(model, name, adapter.pairs, adapter.scale, 0.0, trainable=False)
    for w in wrapped:
        w.adapters[name].config = {"r": adapter.r, "alpha": adapter.alpha, "dropout": adapter.dropout,
                                   "use_rslora": adapter.use_rslora}
    if activate:
        set_adapter(model, name)
    else:
        _state(model)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on the model, in the order they were added."""
    state = getattr(model, "lora_state", None)
    return list(state.names) if state is not None else []


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Every row uses adapter `name` (None: the base alone); clears a per-row choice."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"no adapter {name!r} on the model (it has {', '.join(adapter_names(model)) or 'none'})")
    state = _state(model)
    state.active, state.rows = name, None


def set_adapter_per_row(model: nn.Module, names: Sequence[str | None] | None) -> None:
    """Row b of the next forwards uses adapter names[b] (None: the base alone); None goes back to set_adapter's choice.

    The batch of each forward must then have len(names) rows. Names not on the model are a ValueError."""
    state = _state(model)
    if names is None:
        state.rows = None
        return
    known = set(adapter_names(model))
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise ValueError(f"no adapter {unknown[0]!r} on the model")
    state.rows = list(names)


@contextmanager
def use_adapters(model: nn.Module, names: str | None | Sequence[str | None]):
    """Within the block the model uses `names` (one name for all rows, or one per row); restored after."""
    state = _state(model)
    saved = (state.active, state.rows)
    try:
        if names is None or isinstance(names, str):
            set_adapter(model, names)
        else:
            set_adapter_per_row(model, names)
        yield
    finally:
        state.active, state.rows = saved


def remove_lora(model: nn.Module) -> None:
    """Put every wrapped layer back as it was (the adapters are dropped)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            owner, attr = _parent(model, name)
            setattr(owner, attr, m.base)
    if hasattr(model, "lora_state"):
        del model.lora_state


def merge_into_weights(weights: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
    """A copy of `weights` (camelid names, "layers.0.attention.wq.weight") with W + scale * B @ A on adapted layers.

    For export: the weights must be float tensors; the input dict and its tensors are left unchanged."""
    shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in weights.items() if k.endswith(".weight") and v.ndim == 2}
    adapter.check_shapes(shapes, "the weights")
    out = dict(weights)
    for module in adapter.pairs:
        w = weights[module + ".weight"]
        if not w.is_floating_point():
            raise ValueError(f"{module}.weight is {w.dtype}: merging needs float weights")
        out[module + ".weight"] = (w.float() + adapter.delta(module).to(w.device)).to(w.dtype)
    return out
