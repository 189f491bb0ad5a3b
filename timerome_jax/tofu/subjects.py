"""Who a TOFU question is about: author names of QA blocks, the subject span of a question, and the
mapping of character spans to token positions. Pure string heuristics, no file access.

Subjects (what causal tracing corrupts and what an edit keys on)
-----------------------------------------------------------------
For every split built from the fictitious authors (full, forget*, retain*, *_perturbed of those,
holdout*) each row gets:

  author        the author's name for its 20-row block (None when the block never names its
                author), found as the capitalised multi-word span (lower-case particles such as
                "van", "der", "de" and a parenthesised nickname such as "(Alex)" allowed inside)
                present in the most of the block's 40 questions+answers, widened to a longer
                span containing it when that span is present in at least half as many texts
                ("Yu Liang" -> "Tan Yu Liang"); a block whose best span is present in fewer than
                10 of the 40 texts is taken to have no name (full block 88, "the author",
                "the fictitious author" throughout, is the only one).
  subject       the exact substring of the question that names the author, or None. Search
                order: (1) the full name; (2) a span of the question with as many words as the
                name whose words each match the name's (difflib ratio >= 0.75, at least one
                identical), which catches typos such as "Jamie Vasquez" for "Jaime Vasquez";
                (3) the longest contiguous part of the name (e.g. the surname), accepted only when
                the capitalised run around it in the question holds nothing but words of the
                name (so "Lorenzo Vasquez", the father, is not taken for "Vasquez").
  subject_source "question" when `subject` is set, "absent" otherwise.
  subject_match "exact" / "fuzzy" / "partial" / None: which rule found it.
  author_index  the author's block number (in full, or in holdout10 for holdout splits).
  global_index  the row's index in full.json (None for holdout rows).

Questions that do not name their author ("What genre does this author write?") get
subject=None, subject_source="absent". We do NOT invent a fallback span: tracing and editing need
the subject's token positions, and a generic phrase ("this author") names no one. Consumers keep
only rows with a subject through `with_subject(rows)`, which warns with the number dropped.
The author is still known for such rows (`author`), e.g. to group facts by author.

Coverage on the packaged data (asserted in tests/test_tofu.py):
  forget01:  38 / 40 questions name their author (38 exact)
  forget05:  190 / 200 (189 exact, 1 partial)
  forget10:  379 / 400 (377 exact, 2 partial)
  full:      3795 / 4000 (3779 exact, 3 fuzzy, 13 partial)
  holdout10: 394 / 400;  retain_perturbed: 385 / 400
Nearly all misses are each author's first question ("What is the full name of the author born in
..., on ...?", "Who is the ... author from ...?"), which asks for the name, plus block 88 (20 rows)
and a few pronoun questions ("What is her date of birth?").
"""
from __future__ import annotations

import difflib
import re
from typing import Optional, Sequence

# --------------------------------------------------------------------------------------------
# authors and subjects
# --------------------------------------------------------------------------------------------

_PARTICLES = frozenset({"van", "von", "der", "den", "de", "del", "della", "da", "das", "dos", "du",
                        "di", "la", "le", "bin", "ibn", "y", "al", "el", "ter", "ten"})
# a word (letters, inner hyphens/apostrophes: "Al-Kuwaiti", "O'Donnell") or a parenthesised
# capitalised word (a nickname: "Alejandro (Alex) Fuentes")
_WORD_RE = re.compile(r"\([^\W\d_]\w*\)|[^\W\d_]\w*(?:[-'’]\w+)*")
_MIN_NAME_FRACTION = 0.25  # of a block's questions+answers (10 of 40)


def _is_cap(w: str) -> bool:
    w = w.lstrip("(")
    return w[:1].isupper() or ("-" in w and w.split("-", 1)[1][:1].isupper())


def _words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) with a possessive 's / ’s split off."""
    out = []
    for m in _WORD_RE.finditer(text):
        w, s, e = m.group(0), m.start(), m.end()
        if len(w) > 2 and w[-2:] in ("'s", "’s"):
            w, e = w[:-2], e - 2
        out.append((w, s, e))
    return out


def _cap_runs(text: str) -> list[list[tuple[str, int, int]]]:
    """Maximal runs of capitalised words separated only by whitespace (particles inside allowed)."""
    runs, cur = [], []
    for w, s, e in _words(text):
        name_like = _is_cap(w) or (w in _PARTICLES and bool(cur))
        if name_like and cur and text[cur[-1][2]:s].strip() == "":
            cur.append((w, s, e))
            continue
        if cur:
            runs.append(cur)
        cur = [(w, s, e)] if _is_cap(w) else []
    if cur:
        runs.append(cur)
    out = []
    for r in runs:
        while r and not _is_cap(r[-1][0]):
            r = r[:-1]
        if r:
            out.append(r)
    return out


def _contains(text: str, span: str) -> bool:
    return find_span(text, span) is not None


def find_span(text: str, span: str) -> Optional[tuple[int, int]]:
    """[start, end) of the first occurrence of `span` in `text` not inside a word (hyphens count as
    word characters), or None."""
    m = re.search(r"(?<![\w\-])" + re.escape(span) + r"(?![\w\-])", text)
    return None if m is None else (m.start(), m.end())


def block_author(rows: Sequence[dict]) -> Optional[str]:
    """The author's name of one block of QA rows (see the module docstring), or None."""
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
    cands = set()
    for t in texts:
        for run in _cap_runs(t):
            for i in range(len(run)):
                for j in range(i + 2, len(run) + 1):
                    sub = run[i:j]
                    if _is_cap(sub[0][0]) and _is_cap(sub[-1][0]) and not sub[0][0].startswith("("):
                        cands.add(t[sub[0][1]:sub[-1][2]])
    if not cands:
        return None
    score = {c: sum(_contains(t, c) for t in texts) for c in cands}
    best = max(cands, key=lambda c: (score[c], len(c), c))
    if score[best] < _MIN_NAME_FRACTION * len(texts):
        return None
    # widen to a longer span containing it ("Yu Liang" -> "Tan Yu Liang") if it is common enough
    wider = [c for c in cands if c != best and _contains(c, best) and 2 * score[c] >= score[best]]
    if wider:
        best = max(wider, key=lambda c: (len(c), score[c], c))
    return best


def _similar(a: str, b: str) -> bool:
    return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio() >= 0.75


def find_subject(question: str, name: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(subject substring of `question`, match kind "exact"/"fuzzy"/"partial") or (None, None).

    See the module docstring for the three rules, tried in that order.
    """
    if not name:
        return None, None
    if find_span(question, name):
        return name, "exact"
    nw = [w for w, _, _ in _words(name)]
    runs = _cap_runs(question)
    # (2) same number of words, each similar, at least one identical (typos in the data)
    for run in runs:
        for i in range(len(run) - len(nw) + 1):
            sub = run[i:i + len(nw)]
            ws = [w for w, _, _ in sub]
            if all(_similar(a, b) for a, b in zip(ws, nw)) and any(a == b for a, b in zip(ws, nw)):
                return question[sub[0][1]:sub[-1][2]], "fuzzy"
    # (3) the longest contiguous part of the name whose surrounding run is made of name words only
    nameset = set(nw)
    best = None
    for i in range(len(nw)):
        for j in range(i + 1, len(nw) + 1):
            part = nw[i:j]
            if not (_is_cap(part[0]) and _is_cap(part[-1])) or part[0].startswith("("):
                continue
            for run in runs:
                rw = [w for w, _, _ in run]
                if not set(rw) <= nameset:
                    continue
                for k in range(len(rw) - len(part) + 1):
                    if rw[k:k + len(part)] == part:
                        s = question[run[k][1]:run[k + len(part) - 1][2]]
                        if best is None or len(s) > len(best):
                            best = s
    if best is not None:
        return best, "partial"
    return None, None


# --------------------------------------------------------------------------------------------
# character and token spans
# --------------------------------------------------------------------------------------------

def subject_char_span(question: str, subject: str) -> tuple[int, int]:
    """[start, end) of the first word-bounded occurrence of `subject` in `question`."""
    span = find_span(question, subject) if subject else None
    if span is None:
        raise ValueError(f"subject {subject!r} not found in question {question!r}")
    return span


def token_span(offsets: Sequence[tuple[int, int]], char_span: tuple[int, int]) -> tuple[int, int]:
    """[first, last+1) of the tokens whose character range overlaps `char_span`.

    offsets: one (start, end) character range per token (zero-width tokens, e.g. BOS, never match).
    """
    s, e = char_span
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < e and b > s]
    if not hit:
        raise ValueError(f"no token overlaps characters [{s}, {e})")
    return hit[0], hit[-1] + 1


def _hf_fast(tokenizer):
    """The HF fast tokenizer behind a wrapper, if any (object with offsets support)."""
    for obj in (tokenizer, *(getattr(tokenizer, a, None) for a in ("hf", "hf_tokenizer", "tokenizer", "_tok", "tok"))):
        if obj is not None and getattr(obj, "is_fast", False):
            return obj
    return None


def token_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(tokenizer.encode(text), one character range per id).

    Uses the offsets of an HF fast tokenizer when the wrapper has one and its ids agree with
    `tokenizer.encode` (leading special tokens of `encode`, e.g. BOS, get (0, 0)); otherwise
    decodes growing prefixes (needs decode(ids[:k]) to be a prefix of `text` for every k).
    """
    ids = list(tokenizer.encode(text))
    hf = _hf_fast(tokenizer)
    if hf is not None:
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        hid, off = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        k = len(ids) - len(hid)
        if k >= 0 and ids[k:] == hid:
            return ids, [(0, 0)] * k + off
    offs, prev = [], 0
    for i in range(len(ids)):
        s = tokenizer.decode(ids[: i + 1])
        if not text.startswith(s) and not text.startswith(s.rstrip()):
            raise ValueError(f"cannot map tokens to characters: decode of the first {i + 1} tokens "
                             f"{s!r} is not a prefix of {text!r}")
        offs.append((prev, max(prev, len(s))))
        prev = max(prev, len(s))
    if prev != len(text.rstrip()) and prev != len(text):
        raise ValueError(f"cannot map tokens to characters: decode(encode(text)) != text for {text!r}")
    return ids, offs
