"""Incremental detokenization with stop strings: the text a stream may emit so far.

Each new token re-decodes the completion (so merges across tokens, e.g. byte-level pieces of one
UTF-8 character, come out right), holds back a trailing replacement character (an unfinished
character) and any tail that could still grow into a stop string, and cuts the text at the first
stop string.
"""

from __future__ import annotations

from moekit.inference.tokenizer import TextTokenizer


class TextStream:
    """Feed token ids with `push`; it returns the newly safe text and tells whether a stop string hit."""

    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (may be empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self.flush()
        self.text = text
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)  # wait for a character's other bytes
        hold = 0
        for s in self.stop:  # a tail that is a prefix of a stop string may still become one
            for n in range(min(len(s) - 1, end), 0, -1):
                if text[end - n:end] == s[:n]:
                    hold = max(hold, n)
                    break
        return self._emit(max(end - hold, self.emitted))

    def flush(self) -> str:
        """All remaining text (at the end of generation)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out
