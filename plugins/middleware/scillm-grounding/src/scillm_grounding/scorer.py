"""How well an answer is supported by its source text. Pure and synchronous.

Method (per answer sentence, then a weighted mean):

1. The source is cut into chunks: its sentences plus windows of two and three consecutive sentences (sentences
   longer than 400 characters are cut into overlapping word windows), so a sentence that merges adjacent source
   sentences still finds its match.
2. Each answer sentence gets ``max(similarity, coverage)``: ``similarity`` is rapidfuzz's ``token_set_ratio``
   against its best chunk (1.0 when the sentence's words are a subset of one chunk's), ``coverage`` is the share of
   its content words (no stop words, 3+ letters) that occur anywhere in the source.
3. Fact check: every number (``1,000`` = ``1000``) and every capitalised name not at the start of the sentence must
   occur in the source; when some do not, the score is capped at ``0.5 * share_of_facts_found`` (a wrong figure
   or an invented name fails a sentence that otherwise reads like the source).
4. Sentences with fewer than two words and no number ("Sure.") are not scored. The answer's score is the mean of
   sentence scores weighted by their content-word counts; a sentence scoring below the threshold is reported as
   ungrounded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attrs import frozen
from rapidfuzz import fuzz, process, utils

__all__ = ["Report", "score"]

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n|\n(?=\s*[-*\u2022]|\s*\d+[.)]\s)")
_WORD = re.compile(r"[a-z0-9]+(?:['\u2019][a-z]+)?")
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?")
_NAME = re.compile(r"\b[A-Z][A-Za-z\-]*[a-z][A-Za-z\-]*")
_STOP = frozenset("""the and for are but not you all any can had her was one our out has him his how its may new now
old see two who boy did get let put say she too use that with have this will your from they know want been good much
some time very when come here just like long make many more only over such take than them well were what into also
their there these those which while would could should about after again being below between both does doing down
during each few further itself most myself nor off once other ours own same so then through under until where why
yes yet whose whom upon onto per via though although because since within without among""".split())
_NOT_NAMES = frozenset({"I", "The", "A", "An", "It", "This", "That", "These", "Those", "He", "She", "They", "We",
                        "You", "In", "On", "At", "For", "And", "But", "Or", "If", "As", "By", "To", "Of"})


@frozen(kw_only=True)
class Report:
    score: float | None                 # None: could not score (see reason)
    ungrounded: tuple[str, ...] = ()
    reason: str | None = None
    sentences: int = 0

    def verified(self, threshold: float) -> bool:
        return self.score is not None and self.score >= threshold


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _chunks(source_sentences: Sequence[str]) -> list[str]:
    pieces: list[str] = []
    for sentence in source_sentences:
        if len(sentence) <= 400:
            pieces.append(sentence)
            continue
        words = sentence.split()
        pieces.extend(" ".join(words[i:i + 60]) for i in range(0, max(len(words) - 30, 1), 30))
    chunks = list(pieces)
    for width in (2, 3):
        chunks.extend(" ".join(pieces[i:i + width]) for i in range(len(pieces) - width + 1))
    return chunks


def _numbers(text: str) -> set[str]:
    found = set()
    for raw in _NUMBER.findall(text):
        number = raw.replace(",", "").lstrip("+")
        if "." in number:
            number = number.rstrip("0").rstrip(".")
        found.add(number)
    return found


def _content_words(words: Sequence[str]) -> list[str]:
    return [w for w in words if len(w) >= 3 and w not in _STOP and not w.isdigit()]


def _names(sentence: str) -> set[str]:
    words = sentence.split()
    rest = " ".join(words[1:]) if words else ""
    return {w for m in _NAME.findall(rest) if m not in _NOT_NAMES for w in _WORD.findall(m.lower())}


def score(answer: str, sources: Sequence[str], threshold: float) -> Report:
    source = "\n\n".join(s for s in sources if s and s.strip())
    if not source.strip():
        return Report(score=None, reason="the source is empty")
    if not answer.strip():
        return Report(score=None, reason="the answer is empty")
    candidates = [s for s in sentences(answer)
                  if len(_WORD.findall(s.lower())) >= 2 or _NUMBER.search(s)]
    if not candidates:
        return Report(score=None, reason="the answer has no checkable statement")
    source_sentences = sentences(source)
    chunks = _chunks(source_sentences)
    source_words = set(_WORD.findall(source.lower()))
    source_words |= {w.split("'")[0].split("\u2019")[0] for w in source_words}
    source_numbers = _numbers(source)
    processed = [utils.default_process(c) for c in chunks]
    similarity = [(process.extractOne(utils.default_process(s), processed, scorer=fuzz.token_set_ratio)
                   or ("", 0.0, 0))[1] for s in candidates]
    total = weight_sum = 0.0
    ungrounded: list[str] = []
    for sentence, best in zip(candidates, similarity, strict=True):
        words = _WORD.findall(sentence.lower())
        content = _content_words(words)
        coverage = sum(1 for w in content if w in source_words or w.split("'")[0] in source_words) / len(content) \
            if content else 0.0
        value = max(float(best) / 100.0, coverage)
        facts = {("#", n) for n in _numbers(sentence)} | {("@", n) for n in _names(sentence)}
        if facts:
            found = sum(1 for kind, v in facts if (v in source_numbers if kind == "#" else v in source_words))
            if found < len(facts):
                value = min(value, 0.5 * found / len(facts))
        weight = float(max(len(content), 1))
        total += value * weight
        weight_sum += weight
        if value < threshold:
            ungrounded.append(sentence)
    return Report(score=round(total / weight_sum, 4), ungrounded=tuple(ungrounded), sentences=len(candidates))
