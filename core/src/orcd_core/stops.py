"""Stop sequences matched on decoded text, across token boundaries.

`StopMatcher.push(text)` takes the text a token released and returns what may be emitted now:
text that could still be the start of a stop sequence is held back until the next pieces decide
it. When a stop sequence completes, everything before it is released, the stop text and anything
after it are dropped, and `stopped` becomes True. `flush()` releases what is held at the end of a
generation that ended for another reason.
"""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Feed newly decoded text; return the text that is safe to emit now."""
        if self.stopped:
            return ""
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf
        first, which = -1, None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first < 0 or i < first):
                first, which = i, s
        if which is not None:
            self.stopped, self.matched, self.held = True, which, ""
            return buf[:first]
        keep = self._partial_suffix(buf)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Release held text (the generation ended without completing a stop sequence)."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop sequence."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
