"""`camelid tokenizer train`: a byte-level BPE tokenizer trained on your text with the `tokenizers` library.

    train_tokenizer(["corpus/"], vocab_size=4096, out="tok/")  ->  tok/tokenizer.json + tokenizer_config.json

The tokenizer is Llama 3's kind: Llama 3's pre-tokenizer split (so llama.cpp knows it as "llama-bpe"), then
byte-level BPE over all 256 bytes (every text encodes, nothing is unknown). Special tokens, at ids 0..4:
<|begin_of_text|> (BOS, put first by the post-processor), <|end_of_text|> (EOS, ends each document in training
data), <|im_start|> and <|im_end|> (ChatML turns; <|im_end|> ends a turn and so generation) and <|pad|>.
The chat template is ChatML, so a pretrained model can be fine-tuned into a chat model with `camelid finetune`
and served with the same template. The folder is what Hugging Face writes (transformers' AutoTokenizer reads it)
and what every camelid command reads (load_tokenizer, or as part of a model folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import CamelidError, DataError
from ..tokenizer import Tokenizer
from .corpus import Corpus

BOS, EOS, IM_START, IM_END, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIALS = (BOS, EOS, IM_START, IM_END, PAD)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MIN_VOCAB = 256 + len(SPECIALS)


def train_tokenizer(paths: Sequence[str | os.PathLike], vocab_size: int, out: str | os.PathLike, *,
                    min_frequency: int = 2, progress: bool = True) -> dict:
    """Train the tokenizer on the text of `paths` (files and folders, see camelid.train.corpus) and write it to
    `out` (tokenizer.json, tokenizer_config.json, generation_config.json); returns a summary dict.
    Raises CamelidError (one line) for a vocabulary too small, no usable text, or an output in the way."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, processors, trainers

    from ..tokenizer import byte_level_pre_tokenizer

    if vocab_size < MIN_VOCAB:
        raise CamelidError(f"--vocab-size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIALS)} special tokens), "
                           f"got {vocab_size}")
    if vocab_size > 1 << 20:
        raise CamelidError(f"--vocab-size {vocab_size} is more than any Llama uses (at most 1,048,576)")
    out = Path(out)
    if (out / "tokenizer.json").exists():
        raise CamelidError(f"{out} already holds a tokenizer.json: choose another --out")
    corpus = Corpus(paths)
    from tokenizers.pre_tokenizers import ByteLevel

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = byte_level_pre_tokenizer("llama3")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(corpus.texts(), trainer=trainer, length=None)
    report = corpus.report
    if report.documents == 0:
        first = f"; first: {report.problems[0]}" if report.problems else ""
        raise DataError(f"no usable text in {', '.join(map(str, paths))} ({report.bad_files} bad files{first})")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    gen = {"bos_token_id": bos_id, "eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(IM_END)]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n", encoding="utf-8")
    return {"path": str(out), "vocab_size": tok.get_vocab_size(), "requested_vocab_size": vocab_size,
            "files": report.files, "documents": report.documents, "bytes": report.bytes,
            "bad_files": report.bad_files, "bad_records": report.bad_records, "problems": report.problems}


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The camelid Tokenizer of a tokenizer folder (tokenizer.json + tokenizer_config.json [+ generation_config]),
    a tokenizer.json file, or a model (store name, file or folder), as every camelid command reads it."""
    from ..formats.tokenizers_io import chat_template_of, from_tokenizer_json, read_json

    p = Path(path)
    folder = p.parent if p.is_file() and p.name == "tokenizer.json" else p
    if (folder / "tokenizer.json").is_file():
        cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        gen = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
        return from_tokenizer_json(folder / "tokenizer.json", cfg, gen, chat_template_of(folder, cfg))
    from ..formats import read
    from ..store import resolve

    return read(resolve(str(path))).tokenizer


# --- the command ---------------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    """`camelid tokenizer train ...` (a command with sub-commands: camelid.cli.parse_args descends into them)."""
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on your text")
    inner = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    t = inner.add_parser("train", help="train a tokenizer: FILES_OR_DIRS... --vocab-size N --out DIR")
    t.add_argument("paths", nargs="+", metavar="FILES_OR_DIRS", help="text, Markdown or JSONL ('text') files, or folders")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="tokens in the vocabulary (special ones included)")
    t.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json and tokenizer_config.json to")
    t.add_argument("--min-frequency", type=int, default=2, metavar="N", help="merges seen fewer times are not learned")
    t.set_defaults(func=cmd_tokenizer_train)
    p.commands = {"train": t}


def cmd_tokenizer_train(args) -> None:
    import sys

    r = train_tokenizer(args.paths, args.vocab_size, args.out, min_frequency=args.min_frequency,
                        progress=sys.stderr.isatty())
    for problem in r["problems"]:
        print(f"camelid: warning: {problem}", file=sys.stderr)
    note = f" (the text held only enough for {r['vocab_size']})" if r["vocab_size"] < r["requested_vocab_size"] else ""
    print(f"{r['path']}: {r['vocab_size']:,} tokens{note} from {r['documents']:,} documents, {r['bytes']:,} bytes "
          f"in {r['files']} files; {r['bad_files']} bad files, {r['bad_records']} bad records")
