"""What quantization costs: a quantized model against its source on the same tokens.

Both models score the same text in the same windows (perplexity.scored_logits); per scored token we take
the KL divergence KL(source || quantized) of the next-token distributions and whether their top-1 tokens
agree, alongside each model's perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from .perplexity import scored_logits

if TYPE_CHECKING:
    from ..formats import Checkpoint

# A few hundred tokens of plain English prose, written for camelid (not from any fixture or corpus).
DEFAULT_TEXT = """\
The old lighthouse stood at the end of a narrow spit of land, where the river met the sea and the water \
changed colour from brown to grey. For more than a century its lamp had turned every night, and the ships \
that passed had learned to trust it the way a traveller trusts a familiar road. The keeper who lived there \
in the last years before the light was made automatic kept a careful journal. Each morning he wrote down \
the direction of the wind, the height of the tide, and the names of the boats that had gone by in the dark.

Most of his entries were short and plain. A storm in October tore the shutters from the kitchen window; a \
flock of geese rested on the rocks for two days in March and then left all at once, as if someone had called \
them. In the summer, children from the village walked out along the path to ask whether they could climb the \
stairs, and he usually let them, counting the steps aloud with them until they reached the top and fell \
silent at the size of the sea.

When the journal was found many years later, people were surprised by how little it said about loneliness. \
The keeper seemed to think of his work as a kind of conversation. The ships could not answer him, but they \
changed course when they saw the light, and that was enough. On the last page he wrote that a good light \
does not need to be admired, only noticed at the right moment, and that the same is true of most useful \
things: a bridge, a kind word, a well-kept clock, or a door that opens without a sound.
"""


@dataclass
class QualityResult:
    source_perplexity: float
    quantized_perplexity: float
    kl_mean: float  # mean over scored tokens of KL(source || quantized), nats
    kl_max: float
    top1_agreement: float  # fraction of scored tokens whose most likely next token is the same
    tokens: int
    scored: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def compare(source: torch.nn.Module, quantized: torch.nn.Module, ids: Sequence[int], window: int | None = None,
            progress: Callable[[int], None] | None = None) -> QualityResult:
    """Score `ids` with both models in the same windows; see QualityResult."""
    if source.config.vocab_size != quantized.config.vocab_size:
        raise ValueError("the two models have different vocabularies")
    window = min(window or source.config.max_seq_len, source.config.max_seq_len, quantized.config.max_seq_len)
    nll_p = nll_q = kl_sum = 0.0
    kl_max, agree, scored, windows = 0.0, 0, 0, 0
    for (w, lp, targets), (_, lq, _) in zip(scored_logits(source, ids, window), scored_logits(quantized, ids, window)):
        logp = torch.log_softmax(lp.float(), dim=-1)
        logq = torch.log_softmax(lq.float().to(lp.device), dim=-1)
        nll_p -= logp.gather(1, targets[:, None]).sum().item()
        nll_q -= logq.gather(1, targets[:, None].to(logq.device)).sum().item()
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0)  # [c]
        kl_sum += kl.sum().item()
        kl_max = max(kl_max, kl.max().item())
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        scored += len(targets)
        windows = w + 1
        if progress:
            progress(len(targets))
    return QualityResult(math.exp(nll_p / scored), math.exp(nll_q / scored), kl_sum / scored, kl_max,
                         agree / scored, len(ids), scored, windows)


def compare_checkpoints(source: Checkpoint, quantized: Checkpoint, text: str = DEFAULT_TEXT, window: int | None = None,
                        progress: Callable[[int], None] | None = None) -> tuple[QualityResult, bool]:
    """Build both checkpoints on the float32 reference path and compare them on `text` (tokenized by the
    source's tokenizer, BOS as the model uses it); also whether the quantized tokenizer gives the same ids."""
    from ..loader import build_model

    ids = source.tokenizer.encode(text, special=False, bos=True)
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens")
    same_tokens = quantized.tokenizer.encode(text, special=False, bos=True) == ids
    a = build_model(source)
    b = build_model(quantized)
    return compare(a, b, ids, window, progress), same_tokens
