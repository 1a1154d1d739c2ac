"""The prompt cache: KV of prompt chunks kept after a request, reused exactly by the next request or turn.

Exactness comes from one rule: a prompt is always prefilled in the same chunks, whatever is cached.
`next_chunk` is that schedule, a function of positions only: whole `big` chunks (aligned at multiples of
`big`) while a whole one fits, then `small` chunks (aligned at multiples of `small`), the last one partial.
A chunk's keys and values are a function of its tokens and of everything before it (the forward of a
chunk of T tokens at positions p..p+T-1 over the cached prefix), so a chunk copied from the cache holds
exactly the numbers the cache-off run would compute: reuse cannot change the output. (Reusing *any* prefix
at token granularity would not be exact here: the quantized kernels' results depend on how many rows they
multiply at once, so a token's KV computed in a chunk of 24 differs from the same token's in a chunk of 44.)

A chunk's key is a hash chain: blake2b(parent key, its tokens), starting from a root that names everything
else that changes the numbers: the model (file, quantization), the adapter and the request's cache salt.
Lookup walks the prompt's schedule from the root and stops at the first miss; keys of different salts,
adapters or models never meet. Blocks are copies (the slot rows are preallocated), evicted least recently
used first when the store is over its byte budget.
"""

from __future__ import annotations

import hashlib
import threading
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
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1

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

    def drop_owner(self, owner: str) -> None:
        """Forget every block a model made (it was unloaded)."""
        with self.lock:
            for key in [k for k, b in self.blocks.items() if b.owner == owner]:
                self.bytes -= self.blocks.pop(key).nbytes

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

    def __init__(self, store: BlockStore, model_key: str, big: int = BIG_CHUNK, small: int = SMALL_CHUNK) -> None:
        if big % small:
            raise ValueError(f"the big prefill chunk ({big}) must be a multiple of the small one ({small})")
        self.store, self.model_key, self.big, self.small = store, model_key, big, small

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def next_chunk(self, pos: int, length: int) -> int:
        return next_chunk(pos, length, self.big, self.small)

    def root(self, adapter: str | None = None, salt: str | None = None) -> bytes:
        return root_key(self.model_key, adapter, salt)

    def is_whole(self, start: int, end: int) -> bool:
        """Whether [start, end) is a whole chunk of the schedule (only those are kept: a partial last chunk
        is not what a longer prompt computes there)."""
        return end - start == (self.big if end - start > self.small else self.small)

    def restore(self, cache: KVCache, row: int, tokens: Sequence[int], adapter: str | None = None,
                salt: str | None = None, compute_last: bool = True) -> tuple[int, bytes]:
        """Copy the longest cached chain of `tokens`' chunks (made with this adapter and salt) into row `row`.

        Returns (tokens restored, the chain key at that point). With compute_last, the chunk holding the last
        token is never restored (its logits are needed)."""
        pos, key = 0, self.root(adapter, salt)
        if not self.enabled or not by_position(cache):
            return 0, key
        while pos < len(tokens):
            end = self.next_chunk(pos, len(tokens))
            if compute_last and end == len(tokens):
                break
            child = chunk_key(key, tokens[pos:end])
            block = self.store.get(child)
            if block is None:
                break
            for layer, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
                k[row, :, pos:end].copy_(block.kv[layer, 0])
                v[row, :, pos:end].copy_(block.kv[layer, 1])
            pos, key = end, child
        return pos, key

    def save(self, cache: KVCache, row: int, tokens: Sequence[int], start: int, end: int, parent: bytes) -> bytes:
        """Keep the chunk [start, end) of row `row` (just computed) if it is a whole chunk; its chain key."""
        key = chunk_key(parent, tokens[start:end])
        if self.enabled and by_position(cache) and self.is_whole(start, end) and self.store.get(key) is None:
            kv = torch.stack([torch.stack([k[row, :, start:end], v[row, :, start:end]])
                              for k, v in zip(cache.k, cache.v, strict=True)])
            self.store.put(key, Block(kv, self.model_key))
        return key

    def reusable_end(self, length: int) -> int:
        """The end of the last whole chunk of a sequence of `length` tokens (what a fill after a reply keeps)."""
        pos = last = 0
        while pos < length:
            end = self.next_chunk(pos, length)
            if self.is_whole(pos, end):
                last = end
            pos = end
        return last


def mb_to_bytes(mb: float) -> int:
    return int(mb * (1 << 20))
