"""The Python API: camelid.load(name_or_path) -> LLM, with generate / chat and their streaming forms."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import chat as chat_mod
from .formats import Checkpoint
from .generate import Request, check_fits, generate_one
from .prompt_cache import BlockStore, PromptCache, mb_to_bytes
from .sampling import SamplingParams
from .textstream import TextStream
from .tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (stop token or string) or "length" (max_tokens or context end)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache (earlier calls' prompts)


DEFAULT_CACHE_MB = 256


class LLM:
    """A loaded model with its tokenizer and chat template.

    Calls share a prompt cache (`cache_mb` MiB of KV, 0 for none): a call whose prompt starts like an earlier
    one's (the next turn of a chat, a shared system prompt) prefills only the rest, with the same output."""

    def __init__(self, model: torch.nn.Module, checkpoint: Checkpoint, cache_mb: float = DEFAULT_CACHE_MB,
                 cache_key: str | None = None) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.tokenizer: Tokenizer = checkpoint.tokenizer
        self.config = checkpoint.config
        self.chat_template, self.chat_template_source = chat_mod.template_for(self.tokenizer)
        # the key names everything that changes the numbers: weights, how they run, the adapter
        self.prompt_cache = PromptCache(BlockStore(mb_to_bytes(cache_mb)),
                                        cache_key or f"{checkpoint.path}|{id(model)}").bind(model)

    # --- prompts ---
    def encode_prompt(self, prompt: str) -> list[int]:
        """Plain completion prompt ids (BOS by the model's convention; special-token names parsed)."""
        return self.tokenizer.encode(prompt, special=True, bos=True)

    def encode_chat(self, messages: chat_mod.Dialog, system: str | None = None) -> list[int]:
        messages = list(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
        return chat_mod.encode_chat(self.tokenizer, messages, self.chat_template)

    # --- generation ---
    def start(self, prompt_ids: Sequence[int], max_tokens: int = 256, sampling: SamplingParams | None = None,
              stop: Sequence[str] = (), speculate=None) -> TextGeneration:
        """A generation from prompt ids: iterate it for text pieces; `.completion` is set at the end.
        speculate: a drafter from camelid.speculate.make_drafter (the same output, fewer model forwards)."""
        check_fits(len(prompt_ids), self.config.max_seq_len)
        request = Request(list(prompt_ids), max_tokens, sampling or SamplingParams(), self.tokenizer.stop_ids)
        return TextGeneration(self.model, self.tokenizer, request, stop, self.prompt_cache, speculate)

    def complete(self, prompt: str, **options) -> Completion:
        """Plain completion of `prompt` (no chat template), with token counts and finish reason."""
        return self.start(self.encode_prompt(prompt), **options).run()

    def generate(self, prompt: str, **options) -> str:
        """The continuation of `prompt` as text. Options: max_tokens, sampling, stop."""
        return self.complete(prompt, **options).text

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Like generate, as text pieces while they come."""
        return iter(self.start(self.encode_prompt(prompt), **options))

    def chat(self, messages: chat_mod.Dialog | str, system: str | None = None, tools: list[dict] | None = None,
             tool_choice: str | dict = "auto", parallel_tool_calls: bool = True, **options) -> str | dict:
        """The assistant's reply to a conversation (or to one user message given as a string).

        With `tools` (OpenAI's form: {"type": "function", "function": {"name", "description", "parameters"}}),
        the reply is the assistant message as a dict, {"role": "assistant", "content": str | None,
        "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]}, ready to
        append to `messages` (then the tool results as {"role": "tool", "tool_call_id", "content"}).
        tool_choice: "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}; calls are
        valid against each tool's `parameters` schema by construction. Options: max_tokens, sampling, stop.
        """
        if tools is None:
            return self.chat_start(messages, system, **options).run().text
        return self._chat_tools(messages, system, tools, tool_choice, parallel_tool_calls, **options)

    def _chat_tools(self, messages, system, tools, tool_choice, parallel, max_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop: Sequence[str] = ()) -> dict:
        import queue

        from .errors import CamelidError
        from .serve import tools as tool_stage
        from .serve.engine import Engine, Finish, make_sequence
        from .serve.params import ApiError

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
        try:
            req = tool_stage.parse_request({"tools": tools, "tool_choice": tool_choice,
                                            "parallel_tool_calls": parallel}, self.chat_template)
            messages, extra = tool_stage.prepare(chat_mod.validate(messages), self.chat_template, req)
        except ApiError as e:
            raise CamelidError(e.message) from None
        ids = chat_mod.encode_chat(self.tokenizer, messages, self.chat_template, **extra)
        check_fits(len(ids), self.config.max_seq_len)
        max_tokens = min(max_tokens, self.config.max_seq_len - len(ids))
        # the server's engine, one slot: it owns the constrained decoding that makes the calls valid
        engine = Engine(self.model, self.tokenizer, max_concurrency=1, max_seq_len=len(ids) + max_tokens + 1)
        events: queue.Queue = queue.Queue()
        seq = make_sequence(ids, max_tokens, events.put, sampling=sampling or SamplingParams(),
                            stop_ids=self.tokenizer.stop_ids, constraint=tool_stage.constraint_for(req))
        text = TextStream(self.tokenizer, stop)
        out = tool_stage.ChatOutput(req, tool_stage.marker_ids(self.tokenizer, req))
        engine.start()
        try:
            engine.submit(seq)
            while True:
                event = events.get()
                if isinstance(event, Finish):
                    if event.reason == "error":
                        raise CamelidError(f"generation failed: {event.message}")
                    break
                if event.id in self.tokenizer.stop_ids:
                    continue
                out.add(text.add(event.id), event.id)
                if text.stopped:
                    engine.cancel(seq)
        finally:
            engine.stop()
        out.add(text.finish(), None)
        out.finish()
        return out.message()

    def chat_stream(self, messages: chat_mod.Dialog | str, system: str | None = None, **options) -> Iterator[str]:
        """Like chat, as text pieces while they come."""
        return iter(self.chat_start(messages, system, **options))

    def chat_start(self, messages: chat_mod.Dialog | str, system: str | None = None, **options) -> TextGeneration:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.start(self.encode_chat(messages, system), **options)


    # --- retrieval ---
    def embed(self, texts: str | Sequence[str], pooling: str = "mean", normalize: bool = True,
              dimensions: int | None = None) -> list[float] | list[list[float]]:
        """Embedding vectors of texts (one list of floats for a string): the final norm's hidden states pooled over
        each text's tokens ("mean", "last" or "cls"), L2-normalised unless normalize=False; dimensions keeps the
        first components (renormalised). Raises CamelidError for a text longer than the context."""
        from . import embed as embed_mod
        from .errors import CamelidError

        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if any(not isinstance(t, str) for t in items):
            raise CamelidError("embed() takes a string or a list of strings")
        try:
            embed_mod.check_pooling(pooling)
        except ValueError as e:
            raise CamelidError(str(e)) from None
        ids = [self.tokenizer.encode(t, special=False, bos=True) for t in items]
        for i, x in enumerate(ids):
            if not x:
                raise CamelidError(f"text {i} is empty: it has no tokens to embed")
            if len(x) > self.config.max_seq_len:
                raise CamelidError(f"text {i} is {len(x)} tokens, longer than the context of {self.config.max_seq_len}")
        out = embed_mod.embed_ids(self.model, ids, pooling, normalize)
        if dimensions is not None:
            try:
                out = embed_mod.shorten(out, dimensions, normalize)
            except ValueError as e:
                raise CamelidError(str(e)) from None
        vectors = out.tolist()
        return vectors[0] if single else vectors

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None,
               method: str = "likelihood") -> list[dict]:
        """Documents ordered by relevance to the query, best first: [{"index", "relevance_score", "document"}].

        method "likelihood": how likely the model finds the query as a question about the document; "llm": the
        model's P(yes) to "does the document answer the query?"; "embedding": cosine similarity of mean-pooled
        embeddings (see camelid/rerank.py)."""
        from . import embed as embed_mod
        from . import rerank as rerank_mod
        from .errors import CamelidError

        docs = list(documents)
        if method == "embedding":
            vectors = torch.tensor(self.embed([query, *docs]))
            scores = rerank_mod.cosine_scores(vectors[0], vectors[1:]).tolist()
        elif method in ("llm", "likelihood"):
            pairs = [rerank_mod.pair_rows(method, self.tokenizer, self.chat_template, query, d) for d in docs]
            rows, starts = [r for r, _ in pairs], [s for _, s in pairs]
            for i, r in enumerate(rows):
                if len(r) > self.config.max_seq_len:
                    raise CamelidError(f"document {i} with the query is {len(r)} tokens, over the context of "
                                       f"{self.config.max_seq_len}")
            scores = [0.0] * len(rows)
            for group in embed_mod.batches([len(r) for r in rows]):
                if method == "likelihood":
                    part = rerank_mod.likelihood_batch(self.model, [rows[i] for i in group], [starts[i] for i in group])
                else:
                    part = rerank_mod.judge_batch(self.model, [rows[i] for i in group], *rerank_mod.answer_ids(self.tokenizer))
                for i, s in zip(group, part.tolist(), strict=True):
                    scores[i] = s
        else:
            raise CamelidError(f"unknown rerank method {method!r}; choose one of {', '.join(rerank_mod.METHODS)}")
        return [{"index": i, "relevance_score": scores[i], "document": docs[i]} for i in rerank_mod.ranked(scores, top_n)]


class TextGeneration:
    """One request's text as it is generated. Iterate for pieces; then `.completion` holds the result."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, request: Request, stop: Sequence[str],
                 prompt_cache: PromptCache | None = None, speculate=None) -> None:
        self.model, self.tokenizer, self.request, self.stop = model, tokenizer, request, stop
        self.prompt_cache, self.speculate = prompt_cache, speculate
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        text = TextStream(self.tokenizer, self.stop)
        ids: list[int] = []
        reason = "length"
        if self.speculate is not None:
            from .speculate import generate_speculative

            tokens = generate_speculative(self.model, self.request, self.speculate)
        else:
            tokens = generate_one(self.model, self.request, self.prompt_cache)
        for tok in tokens:
            ids.append(tok)
            if tok in self.request.stop_ids:
                reason = "stop"
                break
            piece = text.add(tok)
            if piece:
                yield piece
            if text.stopped:
                reason = "stop"
                break
        tail = text.finish()
        if tail:
            yield tail
        self.completion = Completion(text.text, ids, len(self.request.prompt), reason, self.request.cached)

    def run(self) -> Completion:
        for _ in self:
            pass
        return self.completion


def load(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu", quant: str | None = "auto",
         adapter: str | os.PathLike | None = None, cache_mb: float = DEFAULT_CACHE_MB) -> LLM:
    """Load a model by store name or path (a GGUF file, a Hugging Face or Meta folder). None means the default model.

    quant="auto" (default) is the fast path: GGUF Q4_0/Q4_1/Q8_0 weights stay quantized, products in bfloat16;
    "int8" / "int4" quantize every linear layer at load; None is the float32 reference path (see camelid/loader.py).
    adapter: a LoRA adapter folder (peft's format) applied without merging, on either path.
    cache_mb: MiB of prompt KV kept for reuse by later calls (0: none); reuse never changes the output.
    """
    from .formats import read
    from .loader import build_model
    from .store import resolve

    ckpt = read(resolve(name_or_path))
    adapter_data = None
    if adapter is not None:  # read before the slow model load, so a wrong folder fails at once
        from .formats.peft import read_adapter

        adapter_data = read_adapter(adapter)
    from .threads import in_own_thread

    def build():
        model = build_model(ckpt, dtype=dtype, device=device, quant=quant, reuse=True)
        if adapter_data is not None:
            from .train.lora import load_adapter

            load_adapter(model, adapter_data)
        return model

    # converted in a thread that ends with it: the thread that generates is then the only one with an OpenMP team,
    # whichever it is (camelid/threads.py; an app generating in a worker thread decoded 2-4x slower otherwise)
    model = in_own_thread(build)
    from .compiled import attach

    attach(model, ckpt.path, quant)  # the compiled decode step, when `camelid compile` has built one
    return LLM(model, ckpt, cache_mb, cache_key=f"{ckpt.path}|{quant}|{dtype}|{device}|{adapter}")
