"""A request's new text as it grows token by token, with OpenAI's ``stop`` strings.

Text goes out only once it is final: not while its last bytes are half a character, and
not while its end could still become a stop string (which is never sent).

Both cost a constant amount per token, whatever the length of the text so far: the
tokens are decoded in a short window behind the last final character (decoding the
whole text at every token made a long completion quadratic), and each stop string is
followed by a Knuth-Morris-Pratt matcher fed one new character at a time, whose state is
also how many characters at the end may yet begin that stop string. The window starts
one decoded step back, so that a tokenizer that spells a word's leading space from its
neighbour (SentencePiece) decodes it as in the whole text; while the window ends in half
a character it waits for the rest, as vLLM's and TGI's detokenizers do.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.matchers = [_StopMatcher(s) for s in dict.fromkeys(stop) if s]
        self.ids: list[int] = []
        self.text = ""  # the final text so far
        self.sent = 0  # characters of it already given out
        self.stopped = False  # a stop string appeared
        self._prefix = 0  # the window: ids[_prefix:_read] were decoded into the text …
        self._read = 0  # … and ids[_read:] are not final yet
        self._fed = 0  # characters of the text the matchers have seen

    def push(self, token_id: int) -> str:
        """Add a token; the text that is now final (possibly empty)."""
        self.ids.append(token_id)
        before = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix, len(self.ids))
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self.text += window[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._final()

    def finish(self) -> str:
        """The rest of the text when the request ends without a stop string."""
        if self.stopped:
            return ""
        before = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix, len(self.ids))
        self.text += window[len(before) :]
        self._read = len(self.ids)
        given = self._final()
        return given + self._give(len(self.text)) if not self.stopped else given

    def _final(self) -> str:
        """Feed the new characters to the stop matchers; what may go out now."""
        found = None
        for index in range(self._fed, len(self.text)):
            for matcher in self.matchers:
                if matcher.feed(self.text[index]):
                    start = index + 1 - len(matcher.stop)
                    found = start if found is None else min(found, start)
        self._fed = len(self.text)
        if found is not None:
            self.stopped = True
            self.text = self.text[:found]
            return self._give(max(found, self.sent))
        held = max((m.state for m in self.matchers), default=0)
        return self._give(max(len(self.text) - held, self.sent))

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def _give(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = max(end, self.sent)
        return delta


class _StopMatcher:
    """Where a stop string is in a text fed one character at a time (Knuth-Morris-Pratt):
    ``state`` is the length of the longest end of the text that begins the stop string."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.state = 0
        # fallback[i]: the longest proper border of stop[: i + 1]
        self.fallback = [0] * len(stop)
        border = 0
        for i in range(1, len(stop)):
            while border and stop[i] != stop[border]:
                border = self.fallback[border - 1]
            if stop[i] == stop[border]:
                border += 1
            self.fallback[i] = border

    def feed(self, char: str) -> bool:
        """Take the next character; True when the stop string has just ended with it."""
        if self.state == len(self.stop):
            self.state = self.fallback[self.state - 1]
        while self.state and self.stop[self.state] != char:
            self.state = self.fallback[self.state - 1]
        if self.stop[self.state] == char:
            self.state += 1
        return self.state == len(self.stop)
