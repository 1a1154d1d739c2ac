"""The prompt cache: KV of prompt chunks kept after a request, reused exactly by the next request or turn.

Exactness comes from one rule: a prompt is always prefilled in the same chunks, whatever is cached.
`next_chunk` is that schedule, a function of positions only: whole `big` chunks (aligned at multiples of
`big`) while a whole one fits, then `small` chunks (aligned at multiples of `small`), the last one partial.
A chunk's keys and values are a function of its tokens and of everything before it (the forward of a
chunk of T tokens at positions p..p+T-1 over the cached prefix), so a chunk copied from the cache holds
exactly the numbers the cache-off run would compute: reuse cannot change the output. (Reusing *any* prefix
at token granularity is not exact in general: dense products' and torch's attention's results depend on how
many rows they take at once, so a token's KV computed in a chunk of 24 differs from the same token's in a
chunk of 44.)

Token granularity where it is exact (`granular`): on the quantized fast path with camelid's attention kernel
(camelid/kernels.py), a chunk of fewer than 128 tokens computes every token on its own (the int4/int8 kernels
multiply row by row, the attention kernel takes each query alone), so in the small chunks' region a token's KV
depends on the tokens up to it and nothing else. `rows_independent` checks that on the model itself, once per
model: the same prompt prefilled in two different groupings must give the same bits in every layer. Then the
last, partial small chunk of a prompt is kept too, and a later prompt reuses its longest cached prefix to the
token (within the small chunks; a big chunk is still reused whole or not at all), so a chat turn prefills only
its new tokens.

A chunk's key is a hash chain: blake2b(parent key, its tokens), starting from a root that names everything
else that changes the numbers: the model (file, quantization), the adapter and the request's cache salt.
Lookup walks the prompt's schedule from the root and stops at the first miss; keys of different salts,
adapters or models never meet. Blocks are copies (the slot rows are preallocated), evicted least recently
used first when the store is over its byte budget.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache

BIG_CHUNK = 256  # prompt tokens per forward for long prompts (the engine's prefill chunk)
SMALL_CHUNK = 16  # the tail's chunks: the granularity of reuse past the last whole big chunk


def next_chunk(pos: int, length: int, big: int = BIG_CHUNK, small: int = SMALL_CHUNK) -> int:
    """The end of the prefill chunk that starts at `pos` in a prompt of `length` tokens (the canonical schedule)."""
    if pos % big == 0 and pos + big <= length:
        return pos + big
    return min(pos + small - pos % small, length)


def root_key(*parts: object) -> bytes:
    """The chain's root for everything besides the tokens that changes a chunk's numbers."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def chunk_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class Block:
    kv: torch.Tensor  # [layers, 2, K, T, E]: the keys and values of one chunk
    owner: str  # what made it (a model's name), so a model's blocks go when it is unloaded
    # a small chunk kept to the token (`granular`): its chain key's parent and its tokens, so that a prompt that
    # shares only part of it finds it (BlockStore.children) and reuses that part
    parent: bytes | None = None
    tokens: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class BlockStore:
    """Chunks' KV by key, bounded in bytes, least recently used evicted first. Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = max(0, int(capacity_bytes))
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0  # requests that reused something / nothing; blocks evicted
        self.hit_tokens = 0
        self.running: dict[object, int] = {}  # KV bytes the running requests hold, per engine (reserve())
        self.under: dict[bytes, set[bytes]] = {}  # parent key -> the keys of its granular children
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def room(self) -> int:
        """Bytes the cached blocks may take: the budget less what running requests' KV holds."""
        return self.capacity - sum(self.running.values())

    def reserve(self, owner: object, nbytes: int) -> None:
        """The running requests of `owner` (an engine) hold nbytes of KV now: they count against the same budget, so
        cached blocks are evicted (least recently used first) until blocks and running KV fit together."""
        with self.lock:
            if nbytes:
                self.running[owner] = nbytes
            else:
                self.running.pop(owner, None)
            self._evict_to(self.room)

    def _evict_to(self, limit: int) -> None:
        while self.blocks and self.bytes > limit:
            key, old = self.blocks.popitem(last=False)
            self._forget(key, old)
            self.evictions += 1

    def _forget(self, key: bytes, old: Block) -> None:
        self.bytes -= old.nbytes
        if old.parent is not None:
            siblings = self.under.get(old.parent, set())
            siblings.discard(key)
            if not siblings:
                self.under.pop(old.parent, None)

    def children(self, parent: bytes) -> list[tuple[bytes, tuple[int, ...]]]:
        """The granular chunks kept right after `parent`: (key, tokens) each."""
        with self.lock:
            return [(k, self.blocks[k].tokens) for k in self.under.get(parent, ())]

    def get(self, key: bytes) -> Block | None:
        with self.lock:
            block = self.blocks.get(key)
            if block is not None:
                self.blocks.move_to_end(key)
            return block

    def put(self, key: bytes, block: Block) -> None:
        with self.lock:
            if block.nbytes > self.room:
                return
            if key in self.blocks:
                self.blocks.move_to_end(key)
                return
            self._evict_to(self.room - block.nbytes)
            self.blocks[key] = block
            self.bytes += block.nbytes
            if block.parent is not None:
                self.under.setdefault(block.parent, set()).add(key)

    def drop_owner(self, owner: str) -> None:
        """Forget every block a model made (it was unloaded)."""
        with self.lock:
            for key in [k for k, b in self.blocks.items() if b.owner == owner]:
                self._forget(key, self.blocks.pop(key))

    def count(self, reused_tokens: int) -> None:
        with self.lock:
            self.hits += reused_tokens > 0
            self.misses += reused_tokens == 0
            self.hit_tokens += reused_tokens

    def __len__(self) -> int:
        return len(self.blocks)


def by_position(cache: KVCache) -> bool:
    """Whether every layer keeps position p in slot p, so chunks copy as slot ranges. Not so for Llama 4's chunked
    layers once the cache is longer than a chunk (they keep p in slot p % chunk): such caches are never reused."""
    return len({k.shape[2] for k in cache.k}) == 1


_independent: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # rows_independent's answers, per model


def rows_independent(model: torch.nn.Module) -> bool:
    """Whether the model computes each token of a small prefill chunk independently of the chunk (its keys and
    values the same whichever tokens share its chunk): tried once per model on a random prompt prefilled in two
    groupings, compared bit for bit in every layer. Only the fast path with camelid's attention kernel can pass
    (elsewhere the answer is no without trying)."""
    layers = getattr(model, "layers", ())
    flags = tuple(getattr(layer.attention, "kernel", False) for layer in layers)
    known = _independent.get(model)
    if known is not None and known[0] == flags:  # tried already, attending the same way
        return known[1]
    if not layers or not all(flags):
        _independent[model] = (flags, False)
        return False
    cfg = model.config
    n = 12  # tokens: [12] against [5, 1, 6]
    tokens = torch.randint(cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(model.device)
    caches = []
    with torch.inference_mode():
        for cuts in ((0, n), (0, 5, 6, n)):
            cache = KVCache.for_model(model, 1, n)
            for start, end in zip(cuts, cuts[1:]):
                positions = torch.arange(start, end, device=model.device)[None]
                model(tokens[:, start:end], positions, cache, logits_at=torch.tensor([end - start - 1]))
            caches.append(cache)
    a, b = caches
    same = all(torch.equal(x, y) for x, y in zip(a.k + a.v, b.k + b.v, strict=True))
    _independent[model] = (flags, same)
    return same


class PromptCache:
    """One model's view of a BlockStore: its root keys, and copying chunks between the store and a KV cache row."""

    def __init__(self, store: BlockStore, model_key: str, big: int = BIG_CHUNK, small: int = SMALL_CHUNK) -> None:
        if big % small:
            raise ValueError(f"the big prefill chunk ({big}) must be a multiple of the small one ({small})")
        self.store, self.model_key, self.big, self.small = store, model_key, big, small
        self._granular: bool | None = False  # reuse to the token within the small chunks (bind()); None: not tried yet
        self._model: weakref.ref | None = None

    def bind(self, model: torch.nn.Module) -> PromptCache:
        """Reuse to the token when the model computes the small chunks' tokens independently (rows_independent),
        tried when first needed: never for a cache that is off (its requests neither reuse nor keep anything)."""
        self._model, self._granular = weakref.ref(model), None
        return self

    @property
    def granular(self) -> bool:
        if self._granular is None:
            model = self._model() if self._model is not None else None
            self._granular = model is not None and rows_independent(model)
        return self._granular

    @granular.setter
    def granular(self, value: bool) -> None:
        self._granular = value

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def next_chunk(self, pos: int, length: int) -> int:
        return next_chunk(pos, length, self.big, self.small)

    def root(self, adapter: str | None = None, salt: str | None = None) -> bytes:
        return root_key(self.model_key, adapter, salt, self.enabled and self.granular)

    def _to_token(self, adapter: str | None) -> bool:
        """To the token for this request: not with a served adapter (its LoRA products are not checked row by row)."""
        return self.granular and adapter is None

    def _boundary(self, pos: int) -> int:
        """The start of the schedule's chunk holding `pos` (a small one: partial reuse happens only there)."""
        return pos - pos % self.small

    def is_whole(self, start: int, end: int) -> bool:
        """Whether [start, end) is a whole chunk of the schedule (only those are kept: a partial last chunk
        is not what a longer prompt computes there)."""
        return end - start == (self.big if end - start > self.small else self.small)

    def restore(self, cache: KVCache, row: int, tokens: Sequence[int], adapter: str | None = None,
                salt: str | None = None, compute_last: bool = True) -> tuple[int, bytes]:
        """Copy the longest cached chain of `tokens`' chunks (made with this adapter and salt) into row `row`; with
        `granular`, then the longest cached part of the next small chunk.

        Returns (tokens restored, the chain key at the start of the chunk that holds the next token to compute).
        With compute_last, the last token is never restored (its logits are needed)."""
        pos, key = 0, self.root(adapter, salt)
        if not self.enabled or not by_position(cache):
            return 0, key
        limit = len(tokens) - 1 if compute_last else len(tokens)
        while pos < limit:
            end = self.next_chunk(pos, len(tokens))
            child = chunk_key(key, tokens[pos:end]) if end <= limit else None
            block = self.store.get(child) if child is not None else None
            if block is None and self._to_token(adapter) and end - pos <= self.small:
                # to the token: the kept chunk here that shares the most of what comes next, and that much of it
                want, best, take = tokens[pos : min(end, limit)], None, 0
                for child_key, have in self.store.children(key):
                    n = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
                    if n > take:
                        best, take = child_key, n
                block = self.store.get(best) if best is not None else None
                if block is not None:
                    self._copy_in(cache, row, pos, pos + take, block)
                    return pos + take, key
            if block is None:
                break
            self._copy_in(cache, row, pos, end, block)
            pos, key = end, child
        return pos, key

    @staticmethod
    def _copy_in(cache: KVCache, row: int, start: int, end: int, block: Block) -> None:
        """The block's first end - start positions into slots start..end-1 of the row."""
        n = end - start
        for layer, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
            k[row, :, start:end].copy_(block.kv[layer, 0, :, :n])
            v[row, :, start:end].copy_(block.kv[layer, 1, :, :n])

    def save(self, cache: KVCache, row: int, tokens: Sequence[int], start: int, end: int, parent: bytes,
             adapter: str | None = None) -> bytes:
        """Keep the chunk that [start, end) (just computed) ends, if it is a whole chunk of the schedule, or with
        `granular` its partial last one (then from its chunk's start: `parent` is the chain key there, as restore
        returns it). Returns the chain key for the next chunk."""
        granular = self.enabled and self._to_token(adapter)
        first = start if self.is_whole(start, end) or not granular else self._boundary(start)
        key = chunk_key(parent, tokens[first:end])
        whole = self.is_whole(first, end)
        if self.enabled and by_position(cache) and (whole or granular) and self.store.get(key) is None:
            kv = torch.stack([torch.stack([k[row, :, first:end], v[row, :, first:end]])
                              for k, v in zip(cache.k, cache.v, strict=True)])
            small = granular and end - first <= self.small
            self.store.put(key, Block(kv, self.model_key, parent if small else None,
                                      tuple(tokens[first:end]) if small else ()))
        return key if whole else parent

    def reusable_end(self, length: int, adapter: str | None = None) -> int:
        """How much of a sequence of `length` tokens a fill after a reply keeps: all of it with `granular`, else the
        end of its last whole chunk."""
        if self.enabled and self._to_token(adapter):
            return length
        pos = last = 0
        while pos < length:
            end = self.next_chunk(pos, length)
            if self.is_whole(pos, end):
                last = end
            pos = end
        return last

    def keep(self, cache: KVCache, row: int, tokens: Sequence[int], start: int, salt: str | None = None,
             adapter: str | None = None) -> int:
        """Keep the chunks of row `row` past position `start` (`tokens` all computed in the cache row, the same
        way a prefill computes them: a decoded reply on the eager path, with `granular`), without computing
        anything. Only where the whole sequence's schedule chunks the part before `start` as the row was
        computed (no new big chunk). Returns the tokens kept in all (0 when none)."""
        if not (self.enabled and self._to_token(adapter) and by_position(cache)) or len(tokens) <= start:
            return 0
        if len(tokens) // self.big > start // self.big:  # a big chunk now covers what small ones computed
            return 0
        pos, key = 0, self.root(adapter, salt)
        while pos < len(tokens):
            end = self.next_chunk(pos, len(tokens))
            # from the chunk that holds `start` on (save() keeps it from its own start), the prompt's chain before
            key = (self.save(cache, row, tokens, max(pos, start), end, key, adapter) if end > start
                   else chunk_key(key, tokens[pos:end]))
            pos = end
        return len(tokens)


def mb_to_bytes(mb: float) -> int:
    return int(mb * (1 << 20))
