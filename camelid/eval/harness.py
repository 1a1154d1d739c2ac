"""camelid as an lm-evaluation-harness backend: `lm_eval --model camelid` or `lm_eval.simple_evaluate(model=CamelidLM(...))`.

Registered under the name "camelid" when this module is imported (camelid.eval.run imports it; from lm_eval's own
command line, `--include_path` cannot import Python, so use `camelid eval` or import camelid.eval.harness first).

Scores the way lm-eval's `hf` backend does, so the two agree on the same weights:
- `loglikelihood`: context and continuation are encoded together (lm-eval's TemplateLM._encode_pair moves trailing
  spaces of the context into the continuation); the input is (context + continuation)[:-1], cut on the left to the
  context length when longer (as hf does; the number of cut requests is reported); the continuation's log-probs
  are summed, and `is_greedy` says whether each continuation token is the argmax.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of the context length, the first predicted from the
  prefix token (BOS when the model has one, else EOS).
- `generate_until`: greedy (or sampled when the task asks) continuation up to `max_gen_toks`, cut at the first
  `until` string.
Requests are batched: rows sorted by length, right-padded (plain causal attention: padding after a row's tokens
is never attended to), at most `batch_tokens` tokens per forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..errors import CamelidError


def _progress(total: int, label: str, disable: bool):
    """camelid's progress bar (ETA included), or a stand-in that does nothing."""
    if disable or total < 1:
        class _Quiet:
            def update(self, n: int) -> None: ...

            def close(self) -> None: ...
        return _Quiet()
    from ..progress import Progress

    return Progress(total, label, unit="requests")


@register_model("camelid")
class CamelidLM(TemplateLM):
    """An lm-eval model over a camelid LLM. Model args (lm_eval's --model_args): pretrained (store name or path),
    adapter (LoRA folder), quant (auto, int8, int4, none: the float32 reference path), batch_size, batch_tokens,
    max_length (default: the model's context), add_bos_token (default: the model's own convention), threads."""

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, quant: str | None = "auto",
                 batch_size: int | str = 16, batch_tokens: int = 4096, max_length: int | None = None,
                 add_bos_token: bool | None = None, threads: int | None = None, llm=None, **_ignored) -> None:
        super().__init__()
        if llm is None:
            from ..api import load

            if threads:
                torch.set_num_threads(int(threads))
            quant = None if quant in (None, "none", "None", "reference") else quant
            llm = load(pretrained, quant=quant, adapter=adapter)
        self.llm = llm
        self.model = llm.model
        self.tok = llm.tokenizer
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.batch_tokens = int(batch_tokens)
        self._max_length = int(max_length) if max_length else llm.config.max_seq_len
        self.add_bos = self.tok.add_bos if add_bos_token is None else bool(add_bos_token)
        self.truncated = 0  # requests whose input was cut on the left to fit the context
        self._name = str(pretrained or "camelid")

    # --- what TemplateLM needs ---
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string` (special-token names parsed, as a chat template's text needs); BOS first when the
        model uses one (add_bos_token), as lm-eval's hf backend with a tokenizer's defaults."""
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        ids = self.tok.encode(string, special=True, bos=False)
        if bos and self.tok.bos_id is not None:
            ids = [self.tok.bos_id, *ids]
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    # --- chat templates (lm-eval's --apply_chat_template) ---
    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.llm.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from .. import chat

        text = chat.render(self.llm.chat_template, chat.validate(chat_history), self.tok, add_generation_prompt)
        if self.add_bos and self.tok.bos_id is not None:  # tok_encode adds BOS; a template that writes it keeps one
            bos = self.tok.backend.id_to_token(self.tok.bos_id)
            text = text[len(bos):] if bos and text.startswith(bos) else text
        return text

    # --- scoring ---
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (sum of log-probs, greedy)."""
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise CamelidError("a request has an empty continuation: nothing to score")
            if len(cont) > self.max_length:
                raise CamelidError(f"a continuation of {len(cont)} tokens does not fit the context of {self.max_length}")
            full = list(ctx) + list(cont)
            inp = full[:-1]
            if len(inp) > self.max_length:
                inp = inp[-self.max_length:]
                self.truncated += 1
            rows.append((inp, list(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = _progress(len(rows), "loglikelihood", disable_tqdm)
        i = 0
        while i < len(order):
            width = len(rows[order[i]][0])
            n = max(1, min(self.batch_size, self.batch_tokens // max(width, 1)))
            batch = order[i:i + n]
            for j, (lp, greedy) in zip(batch, self._score_batch([rows[j] for j in batch])):
                out[j] = (lp, greedy)
            bar.update(len(batch))
            i += n
        bar.close()
        return out

    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        device = self.model.device
        width = max(len(inp) for inp, _ in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (inp, _) in enumerate(rows):
            tokens[b, :len(inp)] = torch.tensor(inp)
        k = max(len(cont) for _, cont in rows)
        at = torch.zeros(len(rows), k, dtype=torch.long)  # the positions whose logits predict the continuation
        for b, (inp, cont) in enumerate(rows):
            at[b, :len(cont)] = torch.arange(len(inp) - len(cont), len(inp))
        # right padding comes after every real token, so causal attention never lets a real token see it
        logits = self.model(tokens.to(device), logits_at=at.to(device))  # [B,K,V]
        results = []
        for b, (_, cont) in enumerate(rows):
            n = len(cont)
            lp = torch.log_softmax(logits[b, :n].float(), dim=-1)  # [n,V]
            target = torch.tensor(cont, device=lp.device)
            results.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owners = [], []
        for k, req in enumerate(requests):
            (string,) = req.args
            ids = self.tok_encode(string, add_special_tokens=False)
            for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owners.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owners, scores):
            totals[k] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or seeded) continuations, batch_size rows at a time: requests with the same options run together
        through camelid.generate (a row's tokens are the ones it gets alone), each cut at its first stop string."""
        from ..generate import Request, generate
        from ..sampling import SamplingParams
        from ..textstream import TextStream

        jobs = []  # (index, ids, until, max_gen, sampling)
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1.0) or 0) > 0
            sampling = SamplingParams(temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                                      top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=1234)
            ids = self.tok_encode(context)
            room = self.max_length - max_gen
            if room < 1:
                raise CamelidError(f"max_gen_toks {max_gen} leaves no room in the context of {self.max_length}")
            if len(ids) > room:
                ids = ids[-room:]
                self.truncated += 1
            jobs.append((i, ids, until, max_gen, sampling))
        out: list[str | None] = [None] * len(requests)
        groups: dict = {}
        for job in jobs:
            groups.setdefault((tuple(job[2]), job[3], job[4]), []).append(job)
        bar = _progress(len(requests), "generate", disable_tqdm)
        stop_ids = self.llm.tokenizer.stop_ids
        for (until, max_gen, sampling), group in groups.items():
            group.sort(key=lambda j: -len(j[1]))  # similar lengths together: less padding of the cache
            for start in range(0, len(group), self.batch_size):
                batch = group[start:start + self.batch_size]
                streams = [TextStream(self.llm.tokenizer, until) for _ in batch]
                texts = [[] for _ in batch]
                ended = [False] * len(batch)
                with torch.inference_mode():
                    for step in generate(self.llm.model, [Request(j[1], max_gen, sampling, stop_ids) for j in batch],
                                         self.llm.prompt_cache):
                        for b, tok in enumerate(step):
                            if tok is None or ended[b]:
                                continue
                            if tok in stop_ids:
                                ended[b] = True
                                continue
                            texts[b].append(streams[b].add(tok))
                            ended[b] = streams[b].stopped
                        if all(ended):
                            break
                for b, job in enumerate(batch):
                    text = "".join(texts[b]) + ("" if streams[b].stopped else streams[b].finish())
                    out[job[0]] = text
                    self.cache_hook.add_partial("generate_until", requests[job[0]].args, text)
                bar.update(len(batch))
        bar.close()
        return out
