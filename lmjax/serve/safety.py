"""The content filter: a blocklist applied to what users send and to what the model writes."""

import logging
from collections.abc import Iterator

from lmjax.serve.feedback import FeedbackStore
from lmjax.text.blocklist import Blocklist

log = logging.getLogger(__name__)

REFUSAL = "Sorry, I can't help with that."


class ContentFilter:
    """Blocks text matching `blocklist`; blocks are logged and, given a store, recorded as events."""

    def __init__(self, blocklist: Blocklist, feedback: FeedbackStore | None = None, refusal: str = REFUSAL):
        self.blocklist = blocklist
        self.feedback = feedback
        self.refusal = refusal

    def check(self, text: str) -> str | None:
        """The blocklist entry `text` matches, or None."""
        return self.blocklist.match(text)

    def _log(self, kind: str, term: str, text: str, session_id: str) -> None:
        log.warning("content filter: %s (term %r, session %s)", kind, term, session_id or "-")
        if self.feedback is not None:
            self.feedback.log_event(kind, session_id, term=term, text=text)

    def screen_input(self, text: str, session_id: str = "") -> bool:
        """True (and the block logged) if a user message must be refused."""
        term = self.check(text)
        if term is not None:
            self._log("blocked_input", term, text, session_id)
        return term is not None

    def verdict(self, text: str) -> tuple[int, bool]:
        """How much of a growing reply may be shown, and whether it is blocked. A match that reaches the very
        end of `text` (a word perhaps still growing) holds the text back from its start; a match followed by
        more text blocks it."""
        match = self.blocklist.regex.search(text)
        if match is None:
            return len(text), False
        return match.start(), match.end() < len(text)

    def record_block(self, text: str, session_id: str = "") -> None:
        """Logs (and stores) that a reply was blocked."""
        self._log("blocked_output", self.check(text) or "", text, session_id)

    def screen_stream(self, stream: Iterator[str], session_id: str = "") -> Iterator[str]:
        """Passes on a growing reply; once it matches, yields the refusal instead and stops (see `verdict`)."""
        text, held = None, False
        for text in stream:
            shown, blocked = self.verdict(text)
            if blocked:
                yield self._block(text, session_id)
                return
            held = shown < len(text)
            if not held:
                yield text
        if held:
            yield self._block(text, session_id)

    def _block(self, text: str, session_id: str) -> str:
        self.record_block(text, session_id)
        return self.refusal
