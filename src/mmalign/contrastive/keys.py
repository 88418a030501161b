"""Which captions say the same thing: the keys the contrastive batch sampler keeps apart.

Two captions of the same content in one batch are a false negative: the loss pushes apart two texts that both
describe each image. Identical captions are easy to spot; templated ones ("a picture of X", "an image with X", "X")
are not, and a sentence encoder does not help (MiniLM scores "... on the left" closer to "... on the right" than
to the same caption under another template). So the templates are found from the data: a leading phrase is a
*frame* when it can be dropped: what follows it is, often enough, a caption of its own (or follows another frame).
A caption's key is what follows its longest frame. A leading word that carries content ("one", "two") is not
droppable ("large red triangles on the left" is no caption), so captions that differ in it keep different keys.
Data where every caption is templated and none occurs bare has no frames found: its keys are its captions.

The batch sampler compares keys without their articles, copulas and punctuation too (`same_content`), so "a red
circle is on the left ." and "red circle on left" are one. Word order stays: in "a red three and a blue seven" it
is what binds each colour to its digit, and a reordering that keeps the meaning cannot be told from one that
changes it without reading the sentence.
"""

from __future__ import annotations

import re
from collections import defaultdict

MAX_FRAME_WORDS = 4
# Words that change no caption's content: articles, the copula and pointers (punctuation goes too). Prepositions
# stay ("on" and "in" are relations), as do negations, counts and sides.
FUNCTION_WORDS = frozenset("a an the and is are was were be there this that these those it its".split())


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.lower().split())


def caption_frames(texts: list[str], *, min_share: float = 0.02, min_shared: float = 0.2) -> list[str]:
    """Leading phrases (up to MAX_FRAME_WORDS words) that open at least `min_share` of the distinct captions and
    can be dropped: for at least `min_shared` of the captions a phrase opens, what follows it is itself a caption,
    or follows a phrase already found droppable. Longest first."""
    captions = {_words(t) for t in texts}
    if not captions:
        return []
    openers = defaultdict(list)  # leading phrase -> what follows it, over the captions it opens
    for c in captions:
        for n in range(1, min(MAX_FRAME_WORDS, len(c) - 1) + 1):
            openers[c[:n]].append(c[n:])
    candidates = {p: rest for p, rest in openers.items() if len(rest) >= max(2, min_share * len(captions))}
    known, frames = set(captions), set()
    while True:  # droppable next to bare captions first, then next to frames found so far
        found = {
            p
            for p, rest in candidates.items()
            if p not in frames and sum(r in known for r in rest) >= min_shared * len(rest)
        }
        if not found:
            return sorted((" ".join(p) for p in frames), key=lambda f: (-len(f.split()), f))
        frames |= found
        known |= {r for p in found for r in candidates[p]}


def caption_keys(texts: list[str], frames: list[str] | None = None) -> list[str]:
    """One key per caption: its words, lower-cased, after its longest frame (`caption_frames` unless given)."""
    frames = caption_frames(texts) if frames is None else frames
    framed = [_words(f) for f in sorted(frames, key=lambda f: -len(f.split()))]
    keys = []
    for t in texts:
        w = _words(t)
        for f in framed:
            if len(w) > len(f) and w[: len(f)] == f:
                w = w[len(f) :]
                break
        keys.append(" ".join(w))
    return keys


def same_content(keys: list[str]) -> list[str]:
    """The keys the batch sampler keeps apart: each caption key's words without function words or punctuation,
    in their order."""
    return [" ".join(w for w in re.findall(r"[\w'-]+", k.lower()) if w not in FUNCTION_WORDS) for k in keys]
