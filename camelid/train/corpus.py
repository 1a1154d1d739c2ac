"""A pretraining corpus: files and folders -> a stream of documents, read piece by piece (corpora larger than
memory work), with bad files reported by name and counted, never silently dropped.

    Corpus(["docs/", "notes.md", "web.jsonl"]).documents()  ->  iterator of Document (pieces of text)

What is read: .txt, .text, .md, .markdown and .rst files (each one document) and .jsonl files (one document per
line, its "text" field). A folder is searched recursively for those suffixes, in sorted order; hidden files and
folders are skipped. A file given by name with another suffix is read as text. A file that is not UTF-8 text
(binary, another encoding), is empty or does not exist is a bad file; a JSONL line that is not JSON or has no
string "text" is a bad record. Both are counted and the first few named in `problems`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl",)
PIECE_BYTES = 1 << 20  # a long text file is handed out in line-aligned pieces of about this size
MAX_PROBLEMS = 20


@dataclass
class Document:
    """One document as pieces of text (their concatenation is the document); `source` names it."""

    source: str
    pieces: Iterator[str]


@dataclass
class CorpusReport:
    files: int = 0  # files read (bad ones included)
    documents: int = 0
    bad_files: int = 0
    bad_records: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)  # "PATH: reason" / "PATH:LINE: reason" of the first ones

    def problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)


def find_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files to read: each file as given, each folder's text/Markdown/JSONL files (recursive, sorted)."""
    if not paths:
        raise DataError("give at least one file or folder of text")
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"{p}: no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files in this folder")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"no such file or folder: {p}")
    return out


def _check_text(path: Path, head: bytes) -> str | None:
    """Why `path` cannot be text (judged on its first bytes), or None."""
    if not head:
        return "empty file"
    if b"\0" in head:
        return "a binary file, not text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut by the end of the head
            return f"not UTF-8 text (byte {e.start})"
    return None


class Corpus:
    """Documents from files and folders; `report` counts what was read and what was bad."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.files = find_files(paths)
        self.report = CorpusReport()
        self.total_bytes = sum(f.stat().st_size for f in self.files)

    def documents(self) -> Iterator[Document]:
        """Every document of every file, in order. Bad files and records are counted in `report`, not raised
        (a text file found not to be UTF-8 past its first piece ends there and counts as bad)."""
        for path in self.files:
            self.report.files += 1
            try:
                with path.open("rb") as f:
                    head = f.read(8192)
            except OSError as e:
                self._bad(path, e.strerror or str(e))
                continue
            why = _check_text(path, head)
            if why:
                self._bad(path, why)
                continue
            if path.suffix.lower() in JSONL_SUFFIXES:
                yield from self._jsonl(path)
            else:
                self.report.documents += 1
                yield Document(str(path), self._pieces(path))

    def _bad(self, path: Path, why: str) -> None:
        self.report.bad_files += 1
        self.report.problem(f"{path}: {why}")

    def _pieces(self, path: Path) -> Iterator[str]:
        with path.open("rb") as f:
            while True:
                chunk = f.read(PIECE_BYTES)
                if not chunk:
                    return
                chunk += f.readline()  # end the piece at a line end
                self.report.bytes += len(chunk)
                try:
                    yield chunk.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad(path, f"not UTF-8 text (byte {f.tell() - len(chunk) + e.start}); read up to there")
                    return

    def _jsonl(self, path: Path) -> Iterator[Document]:
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                self.report.bytes += len(raw)
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    why = "not UTF-8 text"
                except json.JSONDecodeError as e:
                    why = f"not valid JSON ({e.msg} at column {e.colno})"
                else:
                    text = record.get("text") if isinstance(record, dict) else None
                    if isinstance(text, str) and text.strip():
                        self.report.documents += 1
                        yield Document(f"{path}:{n}", iter((text,)))
                        continue
                    why = "no non-empty string 'text' field"
                self.report.bad_records += 1
                self.report.problem(f"{path}:{n}: {why}")

    def texts(self) -> Iterator[str]:
        """Every piece of text of every document (for tokenizer training)."""
        for doc in self.documents():
            yield from doc.pieces
