"""Tokenized pretraining data on disk: `camelid prepare` writes it, `camelid pretrain` memory-maps it.

    prepare(["corpus/"], tokenizer="tok/", out="data/")  ->  data/meta.json, train-00000.bin ..., val-00000.bin ...
    TokenBatches("data/", "train", seq_len=256, batch_size=8, rank=r, world=w)  ->  endless, resumable Batch stream

A shard is raw little-endian token ids, uint16 when the vocabulary has at most 65,536 tokens, else uint32.
Documents are concatenated as BOS text EOS (the tokenizer's own BOS/EOS). meta.json lists the shards with their
token counts, the dtype, the tokenizer (copied into DATA/tokenizer/) and the summary (documents, tokens, bad
files and records, the first problems by name).

Validation split: the token stream is cut into blocks of `block_tokens`; every round(1 / val_frac)-th block goes to
the validation shards (spread through the corpus, deterministic). A corpus too small to give a block to
validation gives it the last val_frac of its tokens instead.

Training order: the train stream is read as windows of seq_len + 1 tokens at a stride of seq_len (every token a
target once per epoch). Each epoch visits the windows in an order drawn from (seed, epoch); global micro-batch g
(counted from the start of training, over all processes) holds windows g*B .. g*B+B-1 of that order, and rank r of
world w takes micro-batches r, r + w, ... The position kept in a checkpoint is the number of global micro-batches
consumed, so a run resumes on any process count that divides it (interop-facts.md: per-rank state does not
reshard), and one process taking grad_accum = w micro-batches per step sees exactly the batches w processes do.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import CamelidError, DataError
from .corpus import Corpus
from .data import Batch

META, FORMAT, VERSION = "meta.json", "camelid-tokens", 1
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens (256 MiB of uint16)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            self.file.write(part.astype(self.dtype).tobytes())
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)

    def _open(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def prepare(paths: Sequence[str | os.PathLike], tokenizer: str | os.PathLike, out: str | os.PathLike, *,
            val_frac: float = 0.05, block_tokens: int = 8192, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            progress: bool = True) -> dict:
    """Tokenize the documents of `paths` into shards in `out` (see the module docstring); returns meta.json's dict.
    Raises CamelidError (one line) on bad settings, an output in the way, or a corpus with no usable text."""
    from ..progress import Progress
    from .tokenizer_train import load_tokenizer

    if not 0 < val_frac < 1:
        raise CamelidError(f"--val-frac must be between 0 and 1, got {val_frac}")
    if block_tokens < 16 or shard_tokens < 1:
        raise CamelidError("--block-tokens must be >= 16 and --shard-tokens >= 1")
    out = Path(out)
    if (out / META).exists():
        raise CamelidError(f"{out} already holds prepared data ({META}): choose another --out")
    tok = load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise CamelidError(f"{tokenizer}: the tokenizer has no EOS token to end documents with")
    corpus = Corpus(paths)
    dtype = token_dtype(tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    from ..formats.hf_write import tokenizer_files

    tokenizer_files(tok, 1 << 30, tok_dir)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    period = max(2, round(1 / val_frac))
    buf: list[np.ndarray] = []
    buffered, blocks = 0, 0
    bar = None  # drawn from the first usable document on (a corpus of bad files prints only its error)
    tok.backend.encode_special_tokens = True  # special-token names in the text are text
    seen = 0

    def flush(final: bool = False) -> None:
        nonlocal buf, buffered, blocks
        stream = np.concatenate(buf) if buf else np.zeros(0, dtype=np.int64)
        while len(stream) >= block_tokens or (final and len(stream)):
            block, stream = stream[:block_tokens], stream[block_tokens:]
            if final and not len(stream) and not writers["val"].tokens:  # nothing for validation yet: the tail
                n_val = max(2, math.ceil((writers["train"].tokens + len(block)) * val_frac))
                if n_val >= len(block) + writers["train"].tokens:
                    break
                cut = max(0, len(block) - n_val)
                writers["train"].write(block[:cut])
                writers["val"].write(block[cut:])
                break
            blocks += 1
            writers["val" if blocks % period == 0 else "train"].write(block)
        buf, buffered = [stream], len(stream)

    try:
        for doc in corpus.documents():
            ids: list[int] = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
            for piece in doc.pieces:
                ids += tok.backend.encode(piece, add_special_tokens=False).ids
            ids.append(tok.eos_id)
            buf.append(np.asarray(ids, dtype=np.int64))
            buffered += len(ids)
            if buffered >= block_tokens:
                flush()
            if progress and bar is None:
                bar = Progress(corpus.total_bytes, "prepare")
            if bar is not None:
                bar.update(corpus.report.bytes - seen, status=f"{corpus.report.documents:,} docs")
                seen = corpus.report.bytes
        flush(final=True)
    finally:
        for w in writers.values():
            w.close()
        if bar is not None:
            bar.close()
    report = corpus.report
    if report.documents == 0 or not writers["train"].tokens:
        _remove_outputs(out, writers)
        first = f"; first: {report.problems[0]}" if report.problems else ""
        raise DataError(f"no usable text in {', '.join(map(str, paths))} ({report.bad_files} bad files{first})")
    if not writers["val"].tokens:
        _remove_outputs(out, writers)
        raise DataError(f"the corpus ({writers['train'].tokens} tokens) is too small to hold some out for validation")
    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "tokenizer": "tokenizer", "val_frac": val_frac,
            "block_tokens": block_tokens, "train": writers["train"].shards, "val": writers["val"].shards,
            "files": report.files, "documents": report.documents, "bytes": report.bytes,
            "tokens": {"train": writers["train"].tokens, "val": writers["val"].tokens},
            "bad_files": report.bad_files, "bad_records": report.bad_records, "problems": report.problems}
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _remove_outputs(out: Path, writers: dict) -> None:
    """Remove what a failed prepare wrote (its shards and tokenizer copy), nothing else."""
    for w in writers.values():
        for shard in w.shards:
            (out / shard["file"]).unlink(missing_ok=True)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)


def read_meta(data: str | os.PathLike) -> dict:
    """meta.json of a prepared data folder, checked: a DataError naming the problem otherwise."""
    path = Path(data) / META
    if not path.is_file():
        raise DataError(f"{data}: no {META}; make the data folder with `camelid prepare FILES --tokenizer T --out DIR`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{path}: not camelid prepared data (format {meta.get('format')!r}, version {meta.get('version')!r})")
    for split in ("train", "val"):
        for shard in meta[split]:
            f = Path(data) / shard["file"]
            size = f.stat().st_size if f.is_file() else -1
            if size != shard["tokens"] * np.dtype(meta["dtype"]).itemsize:
                raise DataError(f"{f}: missing or of the wrong size ({size} bytes for {shard['tokens']} tokens)")
    return meta


class TokenStream:
    """The shards of one split as one memory-mapped token sequence."""

    def __init__(self, data: str | os.PathLike, split: str, meta: dict | None = None) -> None:
        meta = meta or read_meta(data)
        dtype = np.dtype(meta["dtype"])
        self.maps = [np.memmap(Path(data) / s["file"], dtype=dtype, mode="r") for s in meta[split] if s["tokens"]]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.n = int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens start..stop-1 (across shard boundaries), as int64."""
        parts = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            m, base = self.maps[k], int(self.starts[k])
            take = min(stop, base + len(m)) - start
            parts.append(np.asarray(m[start - base: start - base + take], dtype=np.int64))
            start += take
            k += 1
        return np.concatenate(parts)


class TokenBatches:
    """Deterministic, resumable, rank-sharded batches of [batch_size, seq_len] windows (see the module docstring)."""

    def __init__(self, data: str | os.PathLike, split: str = "train", *, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        meta = read_meta(data)
        self.stream = TokenStream(data, split, meta)
        self.seq_len, self.batch_size, self.seed, self.rank, self.world = seq_len, batch_size, seed, rank, world
        self.shuffle = shuffle
        self.windows = max(0, (self.stream.n - 1) // seq_len)
        self.micro_per_epoch = self.windows // batch_size  # global micro-batches in an epoch
        if self.micro_per_epoch < 1:
            raise DataError(f"{data}: the {split} split has {self.stream.n:,} tokens, fewer than one batch of "
                            f"{batch_size} x {seq_len} + 1: use a smaller --batch-size or --seq-len, or more text")
        self.steps_per_epoch = max(1, self.micro_per_epoch // world)  # micro-batches per epoch for one rank
        self._start, self._taken = 0, 0  # global micro-batches before this stream started; this rank's since
        self._order_epoch, self._order = -1, None
        self._fingerprint = {"split": split, "tokens": self.stream.n, "seq_len": seq_len, "batch_size": batch_size,
                             "seed": seed, "shuffle": shuffle}

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = self.windows
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def batch(self, g: int) -> Batch:
        """Global micro-batch g."""
        epoch, k = divmod(g, self.micro_per_epoch)
        wins = self._order_of(epoch)[k * self.batch_size: (k + 1) * self.batch_size]
        L = self.seq_len
        rows = np.stack([self.stream.slice(int(w) * L, int(w) * L + L + 1) for w in wins])
        rows = torch.from_numpy(rows)
        B = rows.shape[0]
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), torch.arange(L).expand(B, L), None,
                     B * L, B * L)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            g = self._start + self._taken * self.world + self.rank
            self._taken += 1
            yield self.batch(g)

    @property
    def consumed(self) -> int:
        """Global micro-batches consumed by all ranks together (at a step boundary)."""
        return self._start + self._taken * self.world

    @property
    def epochs_done(self) -> float:
        return self.consumed / self.micro_per_epoch

    def state_dict(self) -> dict:
        return {"micro": self.consumed, "data": dict(self._fingerprint)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data") != self._fingerprint:
            raise DataError(f"the checkpoint's data position was made for other data or batching "
                            f"({state.get('data')} != {self._fingerprint})")
        self._start, self._taken = int(state["micro"]), 0

    def validation(self, max_batches: int) -> list[Batch]:
        """This rank's share of the first max_batches global micro-batches (in order), the same number on every rank."""
        n = min(max_batches, self.micro_per_epoch) // self.world * self.world
        return [self.batch(g) for g in range(self.rank, n, self.world)]


def print_summary(meta: dict, out: str, file=sys.stdout) -> None:
    shards = len(meta["train"]) + len(meta["val"])
    print(f"{out}: {meta['documents']:,} documents, {meta['tokens']['train']:,} train + {meta['tokens']['val']:,} "
          f"validation tokens ({meta['dtype']}) in {shards} shards; {meta['bad_files']} bad files, "
          f"{meta['bad_records']} bad records", file=file)
