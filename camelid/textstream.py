"""Token ids -> text for consumers: complete UTF-8 only, and stop strings that are never emitted."""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer


class TextStream:
    """Feed ids one by one; get back the text that is safe to show.

    Text that could still become the start of a stop string is held back until it cannot; once a
    stop string appears, `stopped` is set and nothing from the stop string on is ever returned.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._decoder = tokenizer.stream()
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False
        self.text = ""  # everything returned so far

    def _release(self, final: bool) -> str:
        if self._stop:
            hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
            if hits:
                out, self._pending, self.stopped = self._pending[: min(hits)], "", True
                self.text += out
                return out
        keep = 0
        if not final:  # hold back the longest tail that is a prefix of some stop string
            for s in self._stop:
                for n in range(min(len(s) - 1, len(self._pending)), keep, -1):
                    if self._pending.endswith(s[:n]):
                        keep = n
                        break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += out
        return out

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.add(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back, once generation is over."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)
