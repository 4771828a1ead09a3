"""A compact XLM-R Unigram tokenizer whose ids equal the ``tokenizers`` library's on our tokenizer.json.

Why: the ``tokenizers`` library holds ~280 MB for the 250k-piece vocabulary; a dict of the
pieces and a list of their scores hold ~45 MB, and only the first ``max_length`` tokens
of a text are ever used, so a long text is tokenised only as far as they reach.

The pipeline is the one tokenizer_json.py describes, step by step as ``tokenizers`` runs it:
special-token literals are split out of the raw text (``lstrip`` ones take the whitespace
before them); each piece of text between them is normalised (normalizer.py), its spaces
become ``▁`` (one prepended unless it starts with one) and it is cut into words before
each ``▁``; each word is segmented by Viterbi over the pieces' scores, ties going to the
first candidate found (shorter pieces, earlier starts), a character no piece starts with
costing ``min score - 10``, consecutive unknown characters fused into one token;
``<s> … </s>`` around the first ``max_length - 2`` tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .normalizer import Normalizer

METASPACE = "\u2581"
UNK_PENALTY = 10.0
# Unicode White_Space (Rust's char::is_whitespace), which an lstrip special token absorbs
WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    map(chr, range(0x2000, 0x200B))
)
WINDOW = 4096  # characters of a long text normalised at a time
LONG_WORD = 2048  # words longer than this are segmented incrementally, as far as the tokens needed
_CHECK_EVERY = 512  # positions between two looks for the settled part of a long word's best path
_LOOK_BACK = 4 * _CHECK_EVERY  # how far back those looks follow the best paths
_SURROGATE = re.compile("[\ud800-\udfff]")
_RUN = re.compile(r"(.)\1*", re.S)  # a run of one character repeated
_RUN_SCAN = 1024  # how far one look for the end of such a run reads (the lattice is built in steps)
#: The most characters one character becomes in normalisation (U+FDFA, 18), bounding a text's tokens.
_MAX_EXPANSION = 18
CACHE_WORDS = 20_000  # words whose ids are remembered (text repeats its words: most are found here)


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool


@dataclass(frozen=True)
class UnigramModel:
    """What the tokenizer is made of (see unigram_file.py for its file)."""

    pieces: Sequence[str]
    scores: Sequence[float]
    normalization: dict[int, str]
    added: Sequence[AddedToken]
    unk_id: int
    bos_id: int
    eos_id: int


class UnigramTokenizer:
    """``encode(text)`` -> token ids with ``<s>``/``</s>``, at most ``max_length`` of them. Thread-safe."""

    def __init__(self, model: UnigramModel, max_length: int) -> None:
        if max_length < 3:
            raise ValueError(f"max_length must leave room for a token besides <s> and </s>, got {max_length}")
        self.max_length = max_length
        self._ids = dict(zip(model.pieces, range(len(model.pieces)), strict=True))
        self._pieces = model.pieces
        self._scores = list(model.scores)
        self._unk = model.unk_id
        self._unk_score = min(self._scores) - UNK_PENALTY
        self._bos, self._eos = model.bos_id, model.eos_id
        self._longest: dict[str, int] = {}  # first character -> longest piece starting with it
        for piece in model.pieces:
            if len(piece) > self._longest.get(piece[0], 0):
                self._longest[piece[0]] = len(piece)
        self._max_piece = max(self._longest.values())
        # character -> (length, id, score) of the pieces that are it repeated, shortest first
        self._repeats: dict[str, list[tuple[int, int, float]]] = {}
        for piece_id, piece in enumerate(model.pieces):
            if len(piece) > 1 and piece == piece[0] * len(piece):
                self._repeats.setdefault(piece[0], []).append((len(piece), piece_id, self._scores[piece_id]))
        for pieces in self._repeats.values():
            pieces.sort()
        self._normalizer = Normalizer(model.normalization)
        self._cache: dict[str, list[int]] = {}
        self._added = {token.content: token for token in model.added}
        self._added_pattern = re.compile("|".join(re.escape(t.content) for t in sorted(
            model.added, key=lambda t: -len(t.content)))) if model.added else None

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``; TypeError for a str that is not valid Unicode (lone surrogates),
        as the ``tokenizers`` library raises."""
        if not isinstance(text, str):
            raise TypeError(f"text to tokenize must be str, not {type(text).__name__}")
        if _SURROGATE.search(text):
            raise TypeError("text to tokenize must be valid Unicode (it holds a lone surrogate)")
        budget = self.max_length - 2
        return [self._bos, *self._first_ids(text, budget)[:budget], self._eos]

    def cannot_exceed(self, text: str) -> bool:
        """Whether ``text`` surely fits in ``max_length`` tokens without tokenising it: each piece is
        at least one character of the normalised text (a space included), and ``▁``, ``<s>`` and
        ``</s>`` come on top (with room to spare for fragments normalised apart)."""
        return len(text) * _MAX_EXPANSION + 8 <= self.max_length or (
            len(self._normalizer.normalize(text)) + 8 <= self.max_length)

    def over_limit(self, text: str) -> list[int] | None:
        """The ids ``encode`` keeps of ``text`` (without ``<s>``/``</s>``), if it has more tokens than
        fit; None if it fits."""
        budget = self.max_length - 2
        ids = self._first_ids(text, budget + 1)
        return ids[:budget] if len(ids) > budget else None

    def text_of(self, ids: Sequence[int]) -> str:
        """The text these ids' pieces spell (normalised), which tokenises back to them as a rule."""
        added = {token.id: token.content for token in self._added.values()}
        text = "".join(added.get(i) or self._pieces[i] for i in ids).replace(METASPACE, " ")
        return text[1:] if text.startswith(" ") else text

    def _first_ids(self, text: str, budget: int) -> list[int]:
        ids: list[int] = []
        for fragment, token_id in self._split_added(text):
            if token_id is not None:
                ids.append(token_id)
            else:
                ids += self._fragment_ids(fragment, budget - len(ids))
            if len(ids) >= budget:
                break
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def _split_added(self, text: str) -> Iterator[tuple[str, int | None]]:
        """Text between special-token literals, and the literals' ids, in order."""
        if self._added_pattern is None:
            yield text, None
            return
        done = 0
        for match in self._added_pattern.finditer(text):
            token = self._added[match.group()]
            start = match.start()
            if token.lstrip:
                while start > done and text[start - 1] in WHITE_SPACE:
                    start -= 1
            if start > done:
                yield text[done:start], None
            yield "", token.id
            done = match.end()
        if done < len(text):
            yield text[done:], None

    def _fragment_ids(self, fragment: str, need: int) -> list[int]:
        """Ids of one piece of text between special tokens: at least its first ``need`` (all if fewer)."""
        ids: list[int] = []
        long_word: _LongWord | None = None  # a long word read so far, its lattice kept as it grows
        for word, complete in self._words(fragment):
            if complete and len(word) <= LONG_WORD:
                ids += self._word_ids(word)
            else:
                long_word = long_word or _LongWord()
                known = self._long_word_ids(long_word, word, need - len(ids), complete)
                if not complete and len(known) >= need - len(ids):
                    return ids + known
                if complete:
                    ids += known
                    long_word = None
            if len(ids) >= need:
                break
        return ids

    def _words(self, fragment: str) -> Iterator[tuple[str, bool]]:
        """The fragment's words after normalisation, in order, as ``(word, True)``, normalising a long
        fragment a window at a time.  A word that grows past LONG_WORD is also given as prefixes
        ``(prefix, False)`` of doubling length while it goes on, so that its first tokens can be had
        without the rest."""
        carry = ""  # the last word of the text normalised so far, which may go on
        started = False
        position = 0
        report = LONG_WORD
        while position < len(fragment):
            window = max(WINDOW, len(carry))  # grows with a long word, so re-splitting stays linear
            end = len(fragment)
            if end - position > window:
                end = self._normalizer.safe_cut(fragment, position + window)
            normalized = self._normalizer.normalize(fragment[position:end]).replace(" ", METASPACE)
            position = end
            if not normalized:
                continue
            if not started and not normalized.startswith(METASPACE):
                normalized = METASPACE + normalized
            started = True
            words = (carry + normalized).split(METASPACE)[1:]
            carry = METASPACE + words.pop()
            for word in words:
                yield METASPACE + word, True
            if len(carry) >= report and position < len(fragment):
                report = 2 * len(carry)
                yield carry, False
        if carry:
            yield carry, True

    def _word_ids(self, word: str) -> list[int]:
        """A (complete, not long) word's ids, remembered."""
        ids = self._cache.get(word)
        if ids is None:
            ids = self._tokens(word, self._best_path(word, len(word)), 0, len(word))
            if len(self._cache) >= CACHE_WORDS:
                self._cache.clear()  # (dict operations are atomic: threads may share the cache)
            self._cache[word] = ids
        return ids

    def _best_path(self, word: str, until: int, state: _Lattice | None = None) -> _Lattice:
        """Forward Viterbi over the starts before ``until`` (a lattice may be continued).  Inside a run
        of one character repeated, as far from its end as the character's longest piece, the only
        pieces are that character repeated: those few are tried, not every length (the same
        candidates in the same order, so the same ids; one letter repeated is ~5x faster)."""
        lattice = state or _Lattice(len(word))
        score, back, token = lattice.score, lattice.back, lattice.token
        get, scores, longest, unk_score = self._ids.get, self._scores, self._longest, self._unk_score
        repeats = self._repeats
        size = len(word)
        run_end = 0  # end of the run of one repeated character that holds `start` (once found)
        for start in range(lattice.done, until):
            char = word[start]
            base = score[start]
            end = start + 1
            piece_id = get(char)
            if piece_id is None:  # no piece is this character: it is unknown
                piece_id, candidate = self._unk, unk_score + base
            else:
                candidate = scores[piece_id] + base
            if back[end] < 0 or candidate > score[end]:
                score[end], back[end], token[end] = candidate, start, piece_id
            reach = start + longest.get(char, 0)
            if start >= run_end:
                run_end = _RUN.match(word, start, start + _RUN_SCAN).end() if end < size and word[end] == char else end
            if reach <= run_end:
                for length, piece_id, piece_score in repeats.get(char, ()):
                    end = start + length
                    candidate = piece_score + base
                    if back[end] < 0 or candidate > score[end]:
                        score[end], back[end], token[end] = candidate, start, piece_id
                continue
            for end in range(start + 2, min(size, reach) + 1):
                piece_id = get(word[start:end])
                if piece_id is not None:
                    candidate = scores[piece_id] + base
                    if back[end] < 0 or candidate > score[end]:
                        score[end], back[end], token[end] = candidate, start, piece_id
        lattice.done = max(lattice.done, until)
        return lattice

    def _path(self, lattice: _Lattice, end: int, stop: int) -> list[int]:
        """Node positions of the best path into ``end``, back to ``stop`` (excluded), in order."""
        nodes = []
        while end > stop:
            nodes.append(end)
            end = lattice.back[end]
        nodes.reverse()
        return nodes

    def _tokens(self, word: str, lattice: _Lattice, stop: int, end: int) -> list[int]:
        """Ids of the best path's tokens from ``stop`` to ``end``, consecutive unknowns fused."""
        ids: list[int] = []
        fused_from = -1
        start = stop
        for node in self._path(lattice, end, stop):
            if lattice.token[node] == self._unk:
                if fused_from < 0:
                    fused_from = start
            else:
                if fused_from >= 0:
                    ids.append(self._ids.get(word[fused_from:start], self._unk))
                    fused_from = -1
                ids.append(lattice.token[node])
            start = node
        if fused_from >= 0:
            ids.append(self._ids.get(word[fused_from:start], self._unk))
        return ids

    def _long_word_ids(self, state: _LongWord, word: str, need: int, complete: bool) -> list[int]:
        """A long word's leading tokens, from the part of its best path that no later character can
        change: once the best paths into every node that an edge past the frontier can leave from
        share a node, the path up to that node is settled.  A settled part ends at a known piece, so
        no fused run of unknowns is cut.  An incomplete word (a prefix) gives only its settled part;
        ``state`` carries the lattice and the settled part from one longer prefix to the next, so a
        word whose path never settles is still segmented once, not once per prefix."""
        lattice = state.lattice
        lattice.grow(len(word))
        longest = self._max_piece
        # starts whose every edge lies inside the text known so far
        reach = len(word) if complete else max(len(word) - longest, 0)
        for until in range(state.checked + _CHECK_EVERY, reach, _CHECK_EVERY):
            self._best_path(word, until, lattice)
            state.checked = until
            state.anchor = self._common_node(lattice, until, longest, state.anchor)
            common = state.anchor
            while common > state.settled and lattice.token[common] == self._unk:
                common = lattice.back[common]
            if common > state.settled:
                state.ids += self._tokens(word, lattice, state.settled, common)
                state.settled = common
                if len(state.ids) >= need:
                    return state.ids
        if not complete:
            return state.ids
        self._best_path(word, len(word), lattice)
        return state.ids + self._tokens(word, lattice, state.settled, len(word))

    @staticmethod
    def _common_node(lattice: _Lattice, until: int, longest: int, settled: int) -> int:
        """The last node shared by the best paths into the final nodes ``until - longest + 1 .. until``,
        given that they all pass ``settled``; ``settled`` if they part for more than _LOOK_BACK
        characters (text such as one letter repeated, whose best path depends on where it ends)."""
        floor = max(settled, until - _LOOK_BACK)
        chain = set()
        node = until
        while node > floor:
            chain.add(node)
            node = lattice.back[node]
        if node != settled and node not in chain and node < floor:
            return settled
        chain.add(node)
        common = until
        for frontier in range(max(until - longest + 1, settled + 1), until):
            node = frontier
            while node not in chain:
                if node <= floor:
                    return settled
                node = lattice.back[node]
            common = min(common, node)
        return common if common > floor or common == settled else settled


class _Lattice:
    """Best score, predecessor and token of the best path into each position of a word."""

    __slots__ = ("back", "done", "score", "token")

    def __init__(self, size: int) -> None:
        self.score = [0.0] * (size + 1)
        self.back = [-1] * (size + 1)
        self.back[0] = 0
        self.token = [0] * (size + 1)
        self.done = 0

    def grow(self, size: int) -> None:
        """Make room for a word grown to ``size`` characters (the positions known are kept)."""
        more = size + 1 - len(self.score)
        if more > 0:
            self.score += [0.0] * more
            self.back += [-1] * more
            self.token += [0] * more


@dataclass
class _LongWord:
    """How far a long word has been segmented: its lattice, the starts looked at for a settled part
    (``checked``), the node every later best path passes (``anchor``), the ids settled up to ``settled``."""

    lattice: _Lattice = field(default_factory=lambda: _Lattice(0))
    checked: int = 0
    anchor: int = 0
    settled: int = 0
    ids: list[int] = field(default_factory=list)
