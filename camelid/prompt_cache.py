"""The prompt cache: KV of prompt chunks kept after a request, reused exactly by the next request or turn.

Exactness comes from one rule: a prompt is always prefilled in the same chunks, whatever is cached.
`next_chunk` is that schedule, a function of positions only: whole `big` chunks (aligned at multiples of
`big`) while a whole one fits, then `small` chunks (aligned at multiples of `small`), the last one partial.
A chunk's keys and values are a function of its tokens and of everything before it (the forward of a
chunk of T tokens at positions p..p+T-1 over the cached prefix), so a chunk copied from the cache holds
exactly the numbers the cache-off run would compute: reuse cannot change the output. (Reusing *any* prefix
at token granularity is not exact in general: dense products and fused attention give a token's KV bits that depend
on how many rows they take at once, so a token's KV computed in a chunk of 24 differs from the same token's in a
chunk of 44.)

Token granularity where it is exact: when a model's products give each row the same bits whatever other rows are
multiplied with it (`rows_independent`, probed once per model: camelid's quantized kernels on the CPU are, float32
matmuls are not), small chunks are computed query by query (each token attended over its own prefix, as decode
attends it alone). A token's keys and values then do not depend on the small chunk it was computed in, so the store
also keeps a prompt's partial last chunk, and a lookup that misses a small chunk copies the longest common prefix
of a cached chunk at that place: a conversation's next turn prefills only what is new (plus its last token, whose
logits are needed). Big chunks stay whole: a turn whose conversation crosses a multiple of the big chunk computes
that span again as one chunk, as the cache-off run does.

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


_INDEPENDENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> rows_independent's answer


def rows_independent(model: torch.nn.Module) -> bool:
    """Whether a chunk of up to SMALL_CHUNK tokens computed query by query gives every token the bits decoding it alone
    gives: probed once per model on its first layer (decode steps against chunks of several sizes, keys, values and
    outputs compared bit for bit). Never with LoRA adapters (their float products), mixture-of-experts or chunked
    attention layers (what a token meets there depends on its neighbours)."""
    cfg = model.config
    if (getattr(model, "lora_state", None) is not None or getattr(cfg, "moe_layers", ()) or
            getattr(cfg, "chunked_layers", ()) or not hasattr(model, "layers")):
        return False
    known = _INDEPENDENT.get(model)
    if known is None:
        known = _INDEPENDENT[model] = _probe_rows(model)
    return known


@torch.inference_mode()
def _probe_rows(model: torch.nn.Module) -> bool:
    from torch import nn

    cfg, layers = model.config, model.layers
    sizes = (SMALL_CHUNK, 2, 3, 5, 7, 11, 13)
    n = 4 + sum(sizes)
    tokens = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(model.device)
    ways = []
    try:
        model.layers = nn.ModuleList([layers[0]])  # one layer tells: the others run the same code on other weights
        for chunks in ((1,) * (n - 4), sizes):
            cache = KVCache.allocate(1, 1, n, cfg.n_kv_heads, cfg.head_dim, model.dtype, model.device)
            model(tokens[:, :4], torch.arange(4, device=model.device)[None], cache, hidden=True)
            pos, out = 4, []
            for size in chunks:
                cache.query_by_query = size > 1
                positions = torch.arange(pos, pos + size, device=model.device)[None]
                out.append(model(tokens[:, pos:pos + size], positions, cache, hidden=True)[0])
                pos += size
            ways.append((cache.k[0], cache.v[0], torch.cat(out)))
    finally:
        model.layers = layers
    return all(torch.equal(a, b) for a, b in zip(*ways, strict=True))


def query_by_query(model: torch.nn.Module, start: int, end: int, small: int = SMALL_CHUNK) -> bool:
    """Whether the prefill chunk [start, end) is computed query by query: a small chunk of a rows_independent model."""
    return 1 < end - start <= small and rows_independent(model)


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
    parent: bytes = b""  # the chain key before it (token-granular lookups search a parent's children)
    tokens: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class BlockStore:
    """Chunks' KV by key, bounded in bytes, least recently used evicted first. Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = max(0, int(capacity_bytes))
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.children: dict[bytes, set[bytes]] = {}  # parent key -> the keys of its cached chunks
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0  # requests that reused something / nothing; blocks evicted
        self.hit_tokens = 0
        self.running: dict[object, int] = {}  # KV bytes the running requests hold, per engine (reserve())
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

    def _forget(self, key: bytes, block: Block) -> None:
        self.bytes -= block.nbytes
        siblings = self.children.get(block.parent)
        if siblings is not None:
            siblings.discard(key)
            if not siblings:
                del self.children[block.parent]

    def drop_prefixes(self, parent: bytes, tokens: Sequence[int]) -> None:
        """Forget the cached chunks after `parent` whose tokens are a shorter prefix of `tokens` (a partial chunk
        that a longer one now covers)."""
        tokens = tuple(tokens)
        with self.lock:
            for key in list(self.children.get(parent, ())):
                block = self.blocks[key]
                if len(block.tokens) < len(tokens) and tokens[:len(block.tokens)] == block.tokens:
                    self._forget(key, self.blocks.pop(key))

    def longest_child(self, parent: bytes, tokens: Sequence[int], longest: int) -> tuple[Block | None, int]:
        """The cached chunk after `parent` (of at most `longest` tokens) whose tokens share the longest prefix with
        `tokens`, and that length."""
        best, most = None, 0
        with self.lock:
            for key in self.children.get(parent, ()):
                block = self.blocks[key]
                if len(block.tokens) > longest:
                    continue
                n = 0
                for a, b in zip(block.tokens, tokens):
                    if a != b:
                        break
                    n += 1
                if n > most:
                    best, most = (key, block), n
            if best is not None:
                self.blocks.move_to_end(best[0])
        return (best[1] if best else None), most

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
            self.children.setdefault(block.parent, set()).add(key)

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


class PromptCache:
    """One model's view of a BlockStore: its root keys, and copying chunks between the store and a KV cache row."""

    def __init__(self, store: BlockStore, model_key: str, big: int = BIG_CHUNK, small: int = SMALL_CHUNK,
                 model: torch.nn.Module | None = None) -> None:
        """model: the model whose KV this caches; where it is rows_independent, reuse is token-granular (exact)."""
        if big % small:
            raise ValueError(f"the big prefill chunk ({big}) must be a multiple of the small one ({small})")
        self.store, self.model_key, self.big, self.small = store, model_key, big, small
        self.model = model
        if model is not None:
            rows_independent(model)  # probed now, not in the middle of a request

    @property
    def exact_tokens(self) -> bool:
        """Whether reuse is token-granular (the model is rows_independent: small chunks are computed query by query)."""
        return self.model is not None and rows_independent(self.model)

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def next_chunk(self, pos: int, length: int) -> int:
        return next_chunk(pos, length, self.big, self.small)

    def root(self, adapter: str | None = None, salt: str | None = None) -> bytes:
        return root_key(self.model_key, adapter, salt)

    def is_whole(self, start: int, end: int) -> bool:
        """Whether [start, end) is a whole chunk of the schedule (only those are kept, unless exact_tokens: a partial
        last chunk is not what a longer prompt computes there)."""
        return end - start == (self.big if end - start > self.small else self.small)

    def query_by_query(self, model: torch.nn.Module, start: int, end: int) -> bool:
        return query_by_query(model, start, end, self.small)

    def restore(self, cache: KVCache, row: int, tokens: Sequence[int], adapter: str | None = None,
                salt: str | None = None, compute_last: bool = True) -> tuple[int, bytes]:
        """Copy the longest cached chain of `tokens`' chunks (made with this adapter and salt) into row `row`.

        Returns (tokens restored, the chain key at that point). With compute_last, the chunk holding the last
        token is never restored (its logits are needed)."""
        pos, key = 0, self.root(adapter, salt)
        if not self.enabled or not by_position(cache):
            return 0, key
        end = pos
        while pos < len(tokens):
            end = self.next_chunk(pos, len(tokens))
            if compute_last and end == len(tokens):
                break
            child = chunk_key(key, tokens[pos:end])
            block = self.store.get(child)
            if block is None:
                break
            self._copy_in(cache, row, block, pos, end)
            pos, key = end, child
        if self.exact_tokens and pos < len(tokens) and end - pos <= self.small:  # part of a small chunk
            limit = end - 1 if compute_last and end == len(tokens) else end
            block, n = self.store.longest_child(key, tokens[pos:limit], self.small)  # a small chunk's, never a big one
            if block is not None:
                self._copy_in(cache, row, block, pos, pos + n)
                pos += n  # the chain key stays the chunk's parent: the chunk is saved whole from its start
        return pos, key

    @staticmethod
    def _copy_in(cache: KVCache, row: int, block: Block, start: int, end: int) -> None:
        for layer, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
            k[row, :, start:end].copy_(block.kv[layer, 0, :, : end - start])
            v[row, :, start:end].copy_(block.kv[layer, 1, :, : end - start])

    def save(self, cache: KVCache, row: int, tokens: Sequence[int], start: int, end: int, parent: bytes) -> bytes:
        """Keep the chunk [start, end) of row `row` (just computed) if it is a whole chunk; its chain key.

        With exact_tokens a small chunk is kept from its place on the grid (a chunk after a token-granular restore
        starts inside one; the row holds the restored part) and kept partial too; the key returned after a partial
        chunk is still its parent's, where the grid's next lookup starts."""
        if self.exact_tokens:
            start -= start % self.small
        key = chunk_key(parent, tokens[start:end])
        whole = self.is_whole(start, end)
        small = self.exact_tokens and end - start <= self.small
        if self.enabled and by_position(cache) and (whole or small) and self.store.get(key) is None:
            if small and self.store.longest_child(parent, tokens[start:end], self.small)[1] == end - start:
                return key if whole else parent  # a partial chunk that a cached longer one already holds
            kv = torch.stack([torch.stack([k[row, :, start:end], v[row, :, start:end]])
                              for k, v in zip(cache.k, cache.v, strict=True)])
            self.store.put(key, Block(kv, self.model_key, parent, tuple(tokens[start:end])))
            if small and self.store.get(key) is not None:  # kept: the shorter partial chunks it holds go
                self.store.drop_prefixes(parent, tokens[start:end])
        return key if whole or not self.exact_tokens else parent

    def reusable_end(self, length: int) -> int:
        """The end of the last whole chunk of a sequence of `length` tokens (what a fill after a reply keeps); with
        exact_tokens, every token."""
        if self.exact_tokens:
            return length
        pos = last = 0
        while pos < length:
            end = self.next_chunk(pos, length)
            if self.is_whole(pos, end):
                last = end
            pos = end
        return last


def mb_to_bytes(mb: float) -> int:
    return int(mb * (1 << 20))
