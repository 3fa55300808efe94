"""Incremental detokenization: token ids in, new text out, robust to tokens that split a UTF-8 character."""

from __future__ import annotations


class Detokenizer:
    """Decodes one thread's tokens as they arrive; `add` returns the text the new token completes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context (keeps leading spaces right)
        self._read = 0  # end of the text already returned

    def add(self, token_id: int) -> str:
        """Append a token; return the newly completed text ('' while a character is still incomplete)."""
        self.ids.append(token_id)
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix : self._read], skip_special_tokens=False)
        now = dec(self.ids[self._prefix :], skip_special_tokens=False)
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before) :]
