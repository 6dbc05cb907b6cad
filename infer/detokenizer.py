"""Incremental detokenization with stop strings, for one sample.

Each new token extends the text by decoding a short window of the most recent tokens (not the whole
output), so a step costs the same whatever the output length. Text that could still turn out to be the
start of a stop string, or an incomplete UTF-8 character, is held back until it is settled; what was
released never changes, so a stream's pieces add up to the final text.
"""

from __future__ import annotations

from typing import Sequence


class Detokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may start a stop string
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.released = 0  # chars of `text` already handed out
        self._prefix = 0  # token window [prefix, read) decodes to the text before the newest tokens
        self._read = 0
        self.stopped = False
        self.stop_hit: str | None = None  # the stop string that ended the text

    def add(self, ids: list[int]) -> None:
        """Take the output ids so far (the newest at the end); extend `text`; detect a stop string."""
        if self.tokenizer is None or self.stopped:
            return
        before = self.tokenizer.decode(ids[self._prefix:self._read])
        after = self.tokenizer.decode(ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # an incomplete character: wait for its remaining bytes
        start = len(self.text)
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(ids)
        if self.stop:
            lo = max(0, start - self.hold)
            hits = [(i, s) for i, s in ((self.text.find(s, lo), s) for s in self.stop) if i >= 0]
            if hits:
                i, self.stop_hit = min(hits)
                self.text = self.text[:i]
                self.stopped = True

    def release(self) -> str:
        """The settled text not handed out yet."""
        end = len(self.text) if self.stopped else max(self.released, len(self.text) - self.hold)
        piece = self.text[self.released:end]
        self.released = end
        return piece

    def finish(self, ids: list[int]) -> str:
        """At the end of the output: fix `text` to the whole output's text (the full decode, or the text cut
        at the stop string) and return what was not handed out yet."""
        if self.tokenizer is not None and not self.stopped:
            self.text = self.tokenizer.decode(ids)
        piece = self.text[self.released:]
        self.released = len(self.text)
        return piece
