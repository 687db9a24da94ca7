"""A request's new text as it grows token by token, with OpenAI's ``stop`` strings.

Text goes out only once it is final: not while its last bytes are half a character, and
not while its end could still become a stop string (which is never sent).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already given out
        self.stopped = False  # a stop string appeared

    def push(self, token_id: int) -> str:
        """Add a token; the text that is now final (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        found = self._first_stop(text)
        if found is not None:
            self.stopped = True
            return self._give(text[:found])
        end = len(text)
        if text.endswith("\ufffd"):  # a character still being spelt by byte tokens
            end -= 1
        held = 0  # the end might be the start of a stop string
        for stop in self.stop:
            for size in range(min(len(stop) - 1, end), held, -1):
                if text[end - size : end] == stop[:size]:
                    held = size
                    break
        end -= held
        return self._give(text[: max(end, self.sent)])

    def finish(self) -> str:
        """The rest of the text when the request ends without a stop string."""
        if self.stopped:
            return ""
        return self._give(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _first_stop(self, text: str) -> int | None:
        start = max(self.sent - max((len(s) for s in self.stop), default=0), 0)
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _give(self, text: str) -> str:
        delta = text[self.sent :]
        self.sent = len(text)
        return delta
