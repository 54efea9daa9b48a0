"""Visual questions -> aspect names: which attribute, of which part of the product, a catalogue's Q&A question asks
about (:func:`question_aspect`), given the nouns that mean the product itself (:func:`product_nouns`).

Used by schema induction and the ABO loader (:mod:`training.abo`) through :mod:`training.induce`, which re-exports
both functions and :data:`ATTRIBUTES`. Pure and deterministic: plain string rules, no model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from inference.output import clean_text

# question keyword -> attribute (first match wins; "type of" and "how many" are handled before these)
ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("smooth or rough", "Texture"),
    ("texture", "Texture"),
    ("colour", "Color"),
    ("color", "Color"),
    ("pattern", "Pattern"),
    ("print", "Pattern"),
    ("finish", "Finish"),
    ("material", "Material"),
    ("made of", "Material"),
    ("fabric", "Material"),
    ("shape", "Shape"),
    ("style", "Style"),
)
_FILLER = frozenset({"main", "primary", "overall", "dominant", "apparent", "predominant", "general", "visible", "the", "a", "an"})
_VERBS = frozenset(
    {
        "have",
        "has",
        "is",
        "are",
        "made",
        "appear",
        "appears",
        "look",
        "looks",
        "shown",
        "visible",
        "used",
        "does",
        "do",
        "seem",
        "seems",
        "in",
        "on",
        "with",
        "feature",
        "features",
        "use",
        "uses",
        "can",
        "be",
        "from",
        "at",
    }
)
_WORDS = re.compile(r"[a-z][a-z'\-]*")


def _forms(word: str) -> set[str]:
    """The word and the singulars it may be the plural of ("cases" -> case, "glasses" -> glass, "shelves" -> shelf)."""
    w = word.removesuffix("'s").removesuffix("'")
    out = {w}
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        out.add(w[:-1])
    if w.endswith("es") and len(w) > 4:
        out.add(w[:-2])
    if w.endswith("ies") and len(w) > 4:
        out.add(w[:-3] + "y")
    if w.endswith("ves") and len(w) > 4:
        out.add(w[:-3] + "f")
    return out


def _is_noun(word: str, nouns: frozenset[str]) -> bool:
    return bool(_forms(word) & nouns)


def _phrase(text: str) -> list[str]:
    """The noun phrase at the start of ``text`` (after an article), cut at the first verb or preposition."""
    words = _WORDS.findall(text)
    while words and words[0] in {"the", "this", "these", "that", "a", "an", "of", "for", "is", "are"}:
        words = words[1:]
    out: list[str] = []
    for w in words:
        if w in _VERBS:
            break
        out.append(w)
    return out


def _part(words: list[str], nouns: frozenset[str]) -> str:
    """'' when the phrase denotes the product itself; else the part it names ("clock's frame" -> "frame")."""
    words = [w for w in words if w not in _FILLER]
    if not words:
        return ""
    for i, w in enumerate(words):  # possessive: what follows "x's" is the part
        if w.endswith("'s") and i + 1 < len(words):
            words = words[i + 1 :]
            break
    if _is_noun(words[-1], nouns):
        return ""
    rest = [w for w in words if not _is_noun(w, nouns)]
    return " ".join(rest)


def _name(part: str, attribute: str) -> str:
    return f"{part.title()} {attribute}" if part else attribute


def question_aspect(question: str, nouns: frozenset[str]) -> str | None:
    """The aspect a visual question asks about, given the category's product nouns (:func:`product_nouns`);
    None for yes/no and unrecognised questions."""
    q = clean_text(question).lower().strip(" ?.!")
    if "smooth or rough" in q:
        return "Texture"
    if q.startswith(("does ", "is ", "are ", "can ", "do ", "has ", "have ", "will ")):
        return None
    if m := re.match(r"how many (.+)$", q):
        part = _part(_phrase(m.group(1)), nouns)
        return f"Number of {part.title()}" if part else "Number of Items"
    if m := re.search(r"\b(?:type|kind) of (.+)$", q):
        part = _part(_phrase(m.group(1)), nouns)
        return _name(part, "Type")
    for keyword, attribute in ATTRIBUTES:
        i = q.find(keyword)
        if i < 0:
            continue
        after = q[i + len(keyword) :]
        m = re.search(r"\b(?:of|for|is|are|on|be) (?:the|this|these|its) (.+)$", after)
        return _name(_part(_phrase(m.group(1)), nouns) if m else "", attribute)
    return None


def product_nouns(category: str, questions: Iterable[str], min_share: float = 0.15) -> frozenset[str]:
    """Nouns that mean the product itself: the words of the slug and the head nouns of at least ``min_share`` of
    the category's questions (with their singular forms: membership is tested on every form)."""
    heads: Counter[str] = Counter()
    n = 0
    for q in questions:
        n += 1
        found = re.findall(r"\bthe ([a-z' \-]+)", q.lower())
        seen = set()
        for phrase in found:
            words = _phrase(phrase)
            if words:
                seen.add(min(_forms(words[-1]), key=lambda f: (len(f), f)))
                if len(words) > 1 and words[0].endswith("'s"):
                    seen.add(min(_forms(words[0]), key=lambda f: (len(f), f)))
        heads.update(seen)
    nouns = {f for w in category.split("_") if len(w) > 2 for f in _forms(w)}
    nouns |= {f for w, c in heads.items() if n and c / n >= min_share for f in _forms(w)}
    return frozenset(nouns)
