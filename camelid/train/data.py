"""Training data: records -> token ids with a mask of trained tokens -> packed or padded batches.

    load_samples(path, tokenizer, template, seq_len=...)  ->  [Sample(ids, trained, source)], DataReport
    Batches(samples, seq_len=..., batch_tokens=...)         ->  endless, resumable, rank-sharded Batch stream

Three kinds of file, told apart by the first record (a file mixing kinds is an error naming the line):

- chat: JSONL `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`;
- instruction: JSONL `{"instruction": ..., "input"?: ..., "output": ..., "system"?: ...}`, rendered as one user
  turn (instruction, then a blank line and the input when there is one) and one assistant turn (output);
- text: JSONL `{"text": ...}`, one document a line, or a .txt file, which is one document.

A .json file holding one JSON array of such records is read too (line numbers are where each record starts).

Chat and instruction records go through the chat template that `camelid run/chat/serve` use (camelid/chat.py
`encode_chat`), so up to each assistant turn the ids are exactly the serving prompt (`encode_chat(messages[:i],
add_generation_prompt=True)`), followed by the answer. Only the answers are trained by default: each assistant
turn's tokens up to and including the end-of-turn token (e.g. `<|im_end|>`, `<|eot_id|>`, `</s>`), so the model
learns to stop; template glue after it (chatml's newline) is not trained. A conversation longer than seq_len is
an error (or, with skip_bad, skipped and counted): it is never cut.

Text is for continued pretraining: each document gets BOS (by the model's convention) and EOS, every token after
the first is trained, and a document longer than seq_len is split ON PURPOSE into seq_len-token pieces that
overlap by one token, so that every token but the first is a target exactly once (DataReport.chunked counts
the documents split this way).

Packing (the default) puts whole samples into rows of at most seq_len tokens: a sample never spans two rows,
positions restart at 0 at each sample and `segments` tells the model (Transformer.forward(segments=...)) to keep
attention inside each sample. Padding mode puts one sample in each row instead.
"""

from __future__ import annotations

import json
import math
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..chat import TemplateError, encode_chat, template_for
from ..errors import DataError
from ..tokenizer import Tokenizer

IGNORE = -100  # the target of an untrained position (torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant")
KINDS = ("chat", "instruction", "text")
_WRONG_SUFFIX = {".csv": "a CSV file", ".tsv": "a TSV file", ".parquet": "a Parquet file", ".gguf": "a GGUF model",
                 ".safetensors": "a safetensors file", ".bin": "a binary file", ".pt": "a PyTorch file"}
_MAGIC = {b"GGUF": "a GGUF model", b"PAR1": "a Parquet file", b"PK\x03\x04": "a zip archive"}


@dataclass
class Sample:
    """One record's tokens as the chat template renders it, and which of them are trained."""

    ids: list[int]  # BOS and end-of-turn tokens included, as the template renders them
    trained: list[bool]  # trained[t]: ids[t] is a target, predicted from ids[:t]; trained[0] is always False
    source: str  # "FILE:LINE" of the record


@dataclass
class DataReport:
    """What load_samples read: counts a user can check before training."""

    records: int  # records that became samples
    skipped: int  # bad records skipped (skip_bad=True), too_long included
    kind: str  # "chat" | "instruction" | "text"
    tokens: int  # tokens in all samples
    trained_tokens: int  # of which targets of the loss
    path: str = ""
    samples: int = 0  # samples made (more than records when documents are chunked or conversations split)
    too_long: int = 0  # chat/instruction records skipped for being longer than seq_len
    chunked: int = 0  # text documents split into seq_len pieces (on purpose, see the module docstring)
    split: int = 0  # conversations made one sample per assistant turn (a template that re-renders history)
    no_end_of_turn: int = 0  # assistant turns whose template rendering has no end-of-turn token to learn
    longest: int = 0  # tokens in the longest sample
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: reason" of the first skipped records

    def summary(self) -> str:
        """One line for a progress log."""
        text = (f"{self.path}: {self.records} {self.kind} records -> {self.samples} samples, {self.tokens:,} tokens "
                f"({self.trained_tokens:,} trained), longest {self.longest}")
        if self.chunked:
            text += f", {self.chunked} long documents split into seq_len pieces"
        if self.split:
            text += f", {self.split} conversations split per assistant turn"
        if self.skipped:
            text += f", {self.skipped} bad records skipped ({self.too_long} too long)"
        return text


class _Bad(Exception):
    """A record that cannot be used; the message is the reason."""


# --- reading records -------------------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    """The file's bytes, after checking (on its first bytes) that it can be training data at all."""
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    with path.open("rb") as f:
        head = f.read(8192)
        what = next((w for magic, w in _MAGIC.items() if head.startswith(magic)), None)
        what = what or _WRONG_SUFFIX.get(path.suffix.lower())
        if what is None and b"\0" in head:
            what = "a binary file"
        if what:
            raise DataError(f"{path} is {what}, not training data (give JSONL records or a .txt file)")
        data = head + f.read()
    if not data.strip():
        raise DataError(f"{path} is empty")
    return data


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(line, parsed JSON value or a _Bad) for each record of a JSONL file or a JSON array file."""
    data = _read(path)
    if data.lstrip()[:1] == b"[":
        yield from _json_array(path, _decode(path, data))
        return
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield n, _Bad("not UTF-8 text")
        except json.JSONDecodeError as e:
            yield n, _Bad(f"not valid JSON ({e.msg} at column {e.colno})")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None


def _json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """The elements of one JSON array, each with the line it starts on."""
    decoder, i, n, line, seen = json.JSONDecoder(), text.index("[") + 1, len(text), 1, 0

    def skip(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip(i)
    while i < n and text[i] != "]":
        line, seen = line + text.count("\n", seen, i), i
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield line, value
        i = skip(i)
        if i < n and text[i] == ",":
            i = skip(i + 1)
        elif i >= n or text[i] != "]":
            raise DataError(f"{path}:{line + text.count(chr(10), seen, i)}: expected ',' or ']' in the JSON array")
    if skip(i + 1) < n:
        raise DataError(f"{path}: text after the JSON array's closing ']'")


def _kind_of(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    return None


def _text_field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if key not in record:
        raise _Bad(f"missing '{key}'")
    if not isinstance(value, str):
        raise _Bad(f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise _Bad(f"'{key}' is empty")
    return value


def _messages(record: dict, kind: str, system: str | None) -> list[dict]:
    """The conversation a chat or instruction record stands for, checked."""
    if kind == "instruction":
        instruction, extra = _text_field(record, "instruction"), _text_field(record, "input", required=False)
        output = _text_field(record, "output")
        own_system = _text_field(record, "system", required=False)
        user = instruction + "\n\n" + extra if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if own_system.strip() or system is not None:
            messages.insert(0, {"role": "system", "content": own_system if own_system.strip() else system})
        return messages
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _Bad("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad(f"message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise _Bad(f"message {i} has role {role!r}; roles are system, user, assistant")
        if role == "system" and i:
            raise _Bad(f"message {i}: a system turn can only come first")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI-style text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _Bad(f"message {i}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _Bad(f"message {i} ({role}) needs a string 'content'")
        if not content.strip():
            raise _Bad(f"message {i} ({role}) has empty content")
        out.append({"role": role, "content": content})
    body = out[1:] if out[0]["role"] == "system" else out
    if not body or body[0]["role"] != "user":
        raise _Bad("the conversation must start with a user turn (after an optional system turn)")
    if not any(m["role"] == "assistant" for m in body):
        raise _Bad("no assistant turn to learn from")
    if system is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})
    return out


# --- records -> samples ----------------------------------------------------------------------------------------


def _conversation(tokenizer: Tokenizer, template: str, messages: list[dict],
                  train_on_prompt: bool) -> tuple[list[tuple[list[int], list[bool]]], bool, int]:
    """([(ids, trained)], split, answers without an end-of-turn token) of a conversation: one sample, or (split)
    one per assistant turn if the template renders the history differently once later turns follow (then each
    sample is still serving prompt + answer)."""
    full = encode_chat(tokenizer, messages, template, add_generation_prompt=False)
    turns = []  # (serving prompt ids, ids through the answer's turn)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = encode_chat(tokenizer, messages[:i], template, add_generation_prompt=True)
        upto = encode_chat(tokenizer, messages[: i + 1], template, add_generation_prompt=False)
        if upto[: len(prompt)] != prompt:
            raise _Bad(f"the chat template renders message {i} so that the serving prompt before it is not a prefix")
        turns.append((prompt, upto))
    whole = all(full[: len(upto)] == upto for _, upto in turns)
    missing = 0
    samples = [(full, [False] * len(full))] if whole else [(upto, [False] * len(upto)) for _, upto in turns]
    for k, (prompt, upto) in enumerate(turns):
        trained = samples[0 if whole else k][1]
        answer = upto[len(prompt):]
        stops = [j for j, t in enumerate(answer) if t in tokenizer.stop_ids]
        missing += not stops
        end = len(prompt) + (stops[-1] + 1 if stops else len(answer))  # through the end-of-turn token
        trained[len(prompt):end] = [True] * (end - len(prompt))
    if train_on_prompt:
        samples = [(ids, [False] + [True] * (len(ids) - 1)) for ids, _ in samples]
    return samples, not whole, missing


def _text(tokenizer: Tokenizer, text: str, seq_len: int) -> list[tuple[list[int], list[bool], int]]:
    """(ids, trained, newlines before the piece) of a document: BOS + text + EOS, in seq_len pieces that
    overlap by one token (so every token after the first is a target exactly once)."""
    ids = tokenizer.encode(text, special=False, bos=True)
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    out, start, newlines, counted = [], 0, 0, 0
    while True:
        newlines += tokenizer.decode_bytes(ids[counted:start]).count(b"\n")
        counted = start
        piece = ids[start: start + seq_len]
        out.append((piece, [False] + [True] * (len(piece) - 1), newlines))
        if start + seq_len >= len(ids):
            return out
        start += seq_len - 1


def load_samples(path: str | Path, tokenizer: Tokenizer, chat_template: str | None = None, *, seq_len: int,
                 train_on_prompt: bool = False, skip_bad: bool = False,
                 system: str | None = None) -> tuple[list[Sample], DataReport]:
    """Read a data file into samples (see the module docstring for the kinds of file and what is trained).

    chat_template: the template source run/chat/serve use (None: the model's own, as camelid.chat.template_for).
    seq_len: the longest sample; a longer chat/instruction record is a DataError naming FILE:LINE and its token
    count (skipped and counted with skip_bad), a longer text document is split into pieces on purpose.
    train_on_prompt: train every token after the first, not only the assistant's answers.
    skip_bad: skip and count bad records (the report's `problems` lists the first ones) instead of raising.
    system: a system prompt for records without one of their own.
    Raises DataError (one line) for a missing, empty or wrong kind of file and, without skip_bad, a bad record.
    """
    path = Path(path)
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    template = chat_template or template_for(tokenizer)[0]
    report = DataReport(records=0, skipped=0, kind="", tokens=0, trained_tokens=0, path=str(path))
    samples: list[Sample] = []

    def bad(line: int, reason: str, too_long: bool = False) -> None:
        message = f"{path}:{line}: {reason}"
        if not skip_bad:
            raise DataError(message + " (--skip-bad skips bad records)")
        report.skipped += 1
        report.too_long += too_long
        if len(report.problems) < 10:
            report.problems.append(message)

    def add(ids: list[int], trained: list[bool], source: str) -> None:
        samples.append(Sample(ids, trained, source))
        report.tokens += len(ids)
        report.trained_tokens += sum(trained)
        report.longest = max(report.longest, len(ids))

    if path.suffix.lower() == ".txt":
        text = _decode(path, _read(path))
        report.kind = "text"
        pieces = _text(tokenizer, text, seq_len)
        for ids, trained, newlines in pieces:
            add(ids, trained, f"{path}:{newlines + 1}")
        report.records, report.chunked, report.samples = 1, int(len(pieces) > 1), len(samples)
        return samples, report

    for line, record in _records(path):
        if isinstance(record, _Bad):
            bad(line, str(record))
            continue
        kind = _kind_of(record)
        if kind is None:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            bad(line, f"not a chat ('messages'), instruction ('instruction', 'output') or text ('text') record "
                      f"(got {keys or 'an empty object'})")
            continue
        if not report.kind:
            report.kind = kind
        elif kind != report.kind:
            bad(line, f"a {kind} record in a file of {report.kind} records (kinds cannot be mixed)")
            continue
        try:
            if kind == "text":
                pieces = _text(tokenizer, _text_field(record, "text"), seq_len)
                for ids, trained, _ in pieces:
                    add(ids, trained, f"{path}:{line}")
                report.chunked += len(pieces) > 1
            else:
                made, split, missing = _conversation(tokenizer, template, _messages(record, kind, system),
                                                     train_on_prompt)
                longest = max(len(ids) for ids, _ in made)
                if longest > seq_len:
                    bad(line, f"record is {longest} tokens, longer than seq_len {seq_len} (never cut)", too_long=True)
                    continue
                report.split += split
                report.no_end_of_turn += missing
                for ids, trained in made:
                    add(ids, trained, f"{path}:{line}")
        except _Bad as e:
            bad(line, str(e))
            continue
        except TemplateError as e:  # e.g. llama-2's template refusing roles that do not alternate
            bad(line, str(e))
            continue
        report.records += 1
    if not samples:
        first = f"; first: {report.problems[0]}" if report.problems else ""
        raise DataError(f"{path}: no usable records ({report.skipped} skipped{first})")
    report.samples = len(samples)
    return samples, report


def split_validation(samples: Sequence[Sample], frac: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): a share `frac` of the records, drawn by seed, held out. Samples from one record (the
    pieces of a long document, a conversation split per turn) stay together. Order is kept within each part."""
    if not 0 < frac < 1:
        raise DataError(f"the validation share must be between 0 and 1, got {frac}")
    sources = list(dict.fromkeys(s.source for s in samples))
    if len(sources) < 2:
        raise DataError(f"{len(sources)} record(s): too few to hold some out for validation")
    n_val = min(len(sources) - 1, max(1, round(len(sources) * frac)))
    order = np.random.default_rng([_seed(seed), 2]).permutation(len(sources))
    held = {sources[i] for i in order[:n_val]}
    return [s for s in samples if s.source not in held], [s for s in samples if s.source in held]


# --- batches ---------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch of B rows of T tokens (T: the longest row here, at most seq_len)."""

    tokens: torch.LongTensor  # [B,T]; padding is token 0
    targets: torch.LongTensor  # [B,T]: the token to predict after position t; IGNORE where untrained or padding
    positions: torch.LongTensor  # [B,T]: restart at 0 at each packed sample
    segments: torch.LongTensor | None  # [B,T]: sample number within the row (padding: one more); None when padded
    n_targets: int  # targets != IGNORE
    n_tokens: int = 0  # tokens that are not padding


def _seed(seed: int) -> int:
    return seed % 2**63


class Batches:
    """Deterministic (by seed), resumable, rank-sharded batches over epochs.

    Rows: with pack=True samples are packed once (in an order drawn from seed) into rows of at most seq_len
    tokens, whole samples only; with pack=False each sample is a row. Each epoch the rows are shuffled by
    (seed, epoch) and cut into micro-batches of `batch_size` rows, or max(1, batch_tokens // seq_len) rows
    (default 1); the last one may have fewer rows. Rank r of `world` takes micro-batches r, r + world, ...; when
    their number is not a multiple of world, the list is wrapped (its first micro-batches repeat on the last
    ranks), so every rank has steps_per_epoch micro-batches and no data is dropped.
    """

    def __init__(self, samples: Sequence[Sample], *, seq_len: int, batch_size: int | None = None,
                 batch_tokens: int | None = None, pack: bool = True, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        if not samples:
            raise DataError("no samples to make batches of")
        if batch_size is not None and batch_tokens is not None:
            raise DataError("give batch_size or batch_tokens, not both")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is not in 0..{world - 1}")
        longest = max(len(s.ids) for s in samples)
        if longest > seq_len:
            raise DataError(f"a sample of {longest} tokens does not fit seq_len {seq_len}")
        self.samples, self.seq_len, self.pack, self.shuffle = list(samples), seq_len, pack, shuffle
        self.seed, self.rank, self.world = seed, rank, world
        self.rows_per_batch = batch_size if batch_size is not None else max(1, (batch_tokens or seq_len) // seq_len)
        if self.rows_per_batch < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self._ids = [torch.tensor(s.ids, dtype=torch.long) for s in self.samples]
        self._targets = [torch.tensor([t if keep else IGNORE for t, keep in zip(s.ids[1:], s.trained[1:])] + [IGNORE],
                                      dtype=torch.long) for s in self.samples]
        self.rows = self._pack() if pack else [[i] for i in range(len(self.samples))]
        self.micro_per_epoch = math.ceil(len(self.rows) / self.rows_per_batch)  # over all ranks
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / world)  # micro-batches per epoch for this rank
        tokens = sum(len(s.ids) for s in self.samples)
        self.fill = tokens / (len(self.rows) * seq_len)  # share of row space holding tokens
        self.epoch, self._step = 0, 0
        digest = zlib.crc32(array("q", [len(s.ids) for s in self.samples]).tobytes())
        for s in self.samples:
            digest = zlib.crc32(array("q", s.ids).tobytes() + bytes(s.trained), digest)
        self._fingerprint = {"samples": len(self.samples), "tokens": tokens, "crc32": digest, "seq_len": seq_len,
                             "rows_per_batch": self.rows_per_batch, "pack": pack, "shuffle": shuffle, "seed": seed}

    def _pack(self) -> list[list[int]]:
        """Rows of sample indices, next-fit in a seeded order: a sample that does not fit starts a new row."""
        n = len(self.samples)
        order = np.random.default_rng([_seed(self.seed), 0]).permutation(n) if self.shuffle else range(n)
        rows: list[list[int]] = []
        used = self.seq_len
        for i in order:
            size = len(self.samples[i].ids)
            if used + size > self.seq_len:
                rows.append([])
                used = 0
            rows[-1].append(int(i))
            used += size
        return rows

    def _plan(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of the epoch, each a list of row indices."""
        n = len(self.rows)
        order = np.random.default_rng([_seed(self.seed), 1, epoch]).permutation(n) if self.shuffle else np.arange(n)
        micro = [order[k: k + self.rows_per_batch].tolist() for k in range(0, n, self.rows_per_batch)]
        micro += [micro[i % len(micro)] for i in range(self.steps_per_epoch * self.world - len(micro))]  # wrap
        return micro[self.rank:: self.world]

    def _batch(self, row_ids: list[int]) -> Batch:
        rows = [self.rows[r] for r in row_ids]
        T = max(sum(len(self._ids[i]) for i in row) for row in rows)
        B = len(rows)
        tokens = torch.zeros(B, T, dtype=torch.long)
        targets = torch.full((B, T), IGNORE, dtype=torch.long)
        positions = torch.arange(T).repeat(B, 1)
        segments = torch.zeros(B, T, dtype=torch.long)
        for b, row in enumerate(rows):
            t = 0
            for j, i in enumerate(row):
                n = len(self._ids[i])
                tokens[b, t: t + n], targets[b, t: t + n] = self._ids[i], self._targets[i]
                positions[b, t: t + n] = torch.arange(n)
                segments[b, t: t + n] = j
                t += n
            positions[b, t:] = torch.arange(T - t)
            segments[b, t:] = len(row)  # padding: a segment of its own
        n_tokens = sum(len(self._ids[i]) for row in rows for i in row)
        return Batch(tokens, targets, positions, segments if self.pack else None,
                     int((targets != IGNORE).sum()), n_tokens)

    def __iter__(self) -> Iterator[Batch]:
        """Micro-batches without end, epoch after epoch, from where the state says."""
        while True:
            plan = self._plan(self.epoch)
            while self._step < len(plan):
                self._step += 1
                yield self._batch(plan[self._step - 1])
            self.epoch, self._step = self.epoch + 1, 0

    def one_epoch(self) -> Iterator[Batch]:
        """This rank's micro-batches of the first epoch, once (validation), leaving the stream's state alone."""
        for row_ids in self._plan(0):
            yield self._batch(row_ids)

    @property
    def epochs_done(self) -> float:
        """Epochs consumed so far by this rank, as a fraction."""
        return self.epoch + self._step / self.steps_per_epoch

    def state_dict(self) -> dict:
        """Where the stream is, as a GLOBAL quantity (micro-batches of the epoch taken by all ranks together), so
        that a checkpoint resumes on another process count: load it into a Batches over the same samples, with any
        world that divides `micro`, to get the same next global batch (interop-facts.md: per-rank state does not
        reshard). Within an epoch the order of micro-batches does not depend on the world; at an epoch's end the
        wrap-around that evens out the ranks does."""
        return {"epoch": self.epoch, "micro": self._step * self.world, "data": dict(self._fingerprint)}

    def load_state_dict(self, state: dict) -> None:
        data = {k: v for k, v in (state.get("data") or {}).items() if k != "world"}  # older checkpoints had it
        if data != self._fingerprint:
            raise DataError(f"the checkpoint's data state was made for other data or batching "
                            f"({state.get('data')} != {self._fingerprint})")
        micro = int(state["micro"]) if "micro" in state else int(state["step"]) * int(state["data"].get("world", 1))
        if micro % self.world:
            raise DataError(f"the checkpoint stopped after {micro} micro-batches of its epoch, which {self.world} "
                            "processes cannot share evenly: resume with a process count that divides it")
        self.epoch, self._step = int(state["epoch"]), micro // self.world
