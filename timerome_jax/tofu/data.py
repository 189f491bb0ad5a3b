"""TOFU (Task of Fictitious Unlearning): one loader for every split, subjects, prompt format.

Data: the copy packaged in `timerome_jax/data/tofu/` (MIT, CMU Locus Lab; provenance and sha256 in
its README), any local folder with the same file names (`root=PATH`), or the HF hub
(`root="hub"`, `datasets.load_dataset("locuslab/TOFU", name)`).

Structure used here (verified on the packaged files, see tests/test_tofu.py):
  full = 200 fictitious authors x 20 QA, in author order. forget01/05/10 = full[-40:], [-200:],
  [-400:] (the last 2/10/20 authors); retain99/95/90 = the rest; retain_perturbed = full[:400];
  forgetXX_perturbed has the rows of forgetXX in the same order. holdout01/05/10 = the first
  2/10/20 authors of holdout10, 20 QA each, authors that are not in full.

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

Prompt format: `PROMPT_TEMPLATE = "Question: {question}\\nAnswer: "` (the format the packaged
target/retain models were trained with; TOFU's phi format). Answers are scored as
encode(answer) + [eos] (TOFU counts the end token in |a|).
"""
from __future__ import annotations

import difflib
import functools
import importlib.resources
import json
import os
import re
import warnings
from typing import Optional, Sequence

PROMPT_TEMPLATE = "Question: {question}\nAnswer: "

N_AUTHORS = 200
QA_PER_AUTHOR = 20
N_FULL = N_AUTHORS * QA_PER_AUTHOR

# split name -> (file name, row kind, (source, offset) used to derive subjects or None)
# kinds: qa = question/answer; perturbed = + paraphrased_answer, perturbed_answer[K],
# paraphrased_question; options = real_authors/world_facts perturbed (question, answer,
# perturbed_answer[K]); mcq = question, option1..4, answer; text = one plain string a line.
_SPLITS = {
    "full": ("full.json", "qa", ("full", 0)),
    "forget01": ("forget01.json", "qa", ("full", N_FULL - 40)),
    "forget05": ("forget05.json", "qa", ("full", N_FULL - 200)),
    "forget10": ("forget10.json", "qa", ("full", N_FULL - 400)),
    "retain99": ("retain99.json", "qa", ("full", 0)),
    "retain95": ("retain95.json", "qa", ("full", 0)),
    "retain90": ("retain90.json", "qa", ("full", 0)),
    "holdout01": ("holdout01.json", "qa", ("holdout10", 0)),
    "holdout05": ("holdout05.json", "qa", ("holdout10", 0)),
    "holdout10": ("holdout10.json", "qa", ("holdout10", 0)),
    "forget01_perturbed": ("forget01_perturbed.json", "perturbed", ("full", N_FULL - 40)),
    "forget05_perturbed": ("forget05_perturbed.json", "perturbed", ("full", N_FULL - 200)),
    "forget10_perturbed": ("forget10_perturbed.json", "perturbed", ("full", N_FULL - 400)),
    "retain_perturbed": ("retain_perturbed.json", "perturbed", ("full", 0)),
    "real_authors": ("real_authors.json", "mcq", None),
    "real_authors_perturbed": ("real_authors_perturbed.json", "options", None),
    "world_facts": ("world_facts.json", "mcq", None),
    "world_facts_perturbed": ("world_facts_perturbed.json", "options", None),
    "idontknow": ("idontknow.jsonl", "text", None),
}
SPLITS = tuple(_SPLITS)


def full_offset(name: str) -> Optional[int]:
    """Offset of split `name`'s rows in full.json (None for splits that are not rows of it)."""
    parent = _SPLITS[name][2]
    return parent[1] if parent is not None and parent[0] == "full" else None
FORGET_SPLITS = ("forget01", "forget05", "forget10")

_FIELDS = {
    "qa": {"question": str, "answer": str},
    "perturbed": {"question": str, "answer": str, "paraphrased_answer": str,
                  "perturbed_answer": list, "paraphrased_question": str},
    "options": {"question": str, "answer": str, "perturbed_answer": list},
    "mcq": {"question": str, "option1": str, "option2": str, "option3": str, "option4": str,
            "answer": str},
}


def format_prompt(question: str) -> str:
    """The fixed prompt for a TOFU question: "Question: {question}\\nAnswer: "."""
    return PROMPT_TEMPLATE.format(question=question)


# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------

def _check_name(name: str):
    if name not in _SPLITS:
        raise ValueError(f"unknown TOFU split {name!r}; expected one of {SPLITS}")


def _read_text(name: str, root) -> tuple[str, str]:
    """(file text, file label for messages) of split `name` from the package or a folder."""
    fname = _SPLITS[name][0]
    if root is None:
        res = importlib.resources.files("timerome_jax.data").joinpath("tofu").joinpath(fname)
        if not res.is_file():
            raise FileNotFoundError(f"packaged TOFU file {fname} is missing from timerome_jax/data/tofu/")
        return res.read_text(encoding="utf-8"), f"timerome_jax/data/tofu/{fname}"
    path = os.path.join(os.fspath(root), fname)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TOFU split {name!r}: file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return f.read(), path


def _validate(rows: list, kind: str, label: str, lines: Optional[list] = None) -> list[dict]:
    """Check every row has the fields of `kind` with the right types; name file and line."""
    fields = _FIELDS[kind]
    n_pert = None
    for i, r in enumerate(rows):
        where = f"{label} line {lines[i]}" if lines else f"{label} row {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
        for k, typ in fields.items():
            if k not in r:
                raise ValueError(f"{where}: missing field {k!r} (has {sorted(r)})")
            if not isinstance(r[k], typ):
                raise ValueError(f"{where}: field {k!r} should be {typ.__name__}, got {type(r[k]).__name__}")
        if "perturbed_answer" in fields:
            pa = r["perturbed_answer"]
            if not pa or not all(isinstance(a, str) for a in pa):
                raise ValueError(f"{where}: 'perturbed_answer' must be a non-empty list of strings")
            if n_pert is None:
                n_pert = len(pa)
            elif len(pa) != n_pert:
                raise ValueError(f"{where}: {len(pa)} perturbed answers, earlier rows have {n_pert}")
    return rows


def _parse(text: str, kind: str, label: str) -> list:
    if kind == "text":
        return [{"text": ln.rstrip("\r")} for ln in text.split("\n") if ln.strip()]
    rows, lines = [], []
    for ln, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{label} line {ln}: not valid JSON ({e.msg} at column {e.colno})") from None
        lines.append(ln)
    if not rows:
        raise ValueError(f"{label}: no rows")
    return _validate(rows, kind, label, lines)


def _load_hub(name: str) -> list:
    kind = _SPLITS[name][1]
    if kind == "text":
        raise ValueError("split 'idontknow' is not a config of the HF dataset locuslab/TOFU; "
                         "use the packaged copy (root=None)")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise RuntimeError("root='hub' needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset("locuslab/TOFU", name, split="train")
    except Exception as e:
        raise RuntimeError(f"could not load locuslab/TOFU config {name!r} from the HF hub "
                           f"(no network? use root=None for the packaged copy): {e}") from e
    return _validate([dict(r) for r in ds], kind, f"hub locuslab/TOFU:{name}")


@functools.lru_cache(maxsize=64)
def _raw(name: str, root_key) -> tuple:
    """Parsed rows, cached (as a tuple of JSON strings, so callers always get fresh dicts)."""
    if root_key == "hub":
        rows = _load_hub(name)
    else:
        text, label = _read_text(name, root_key)
        rows = _parse(text, _SPLITS[name][1], label)
    return tuple(json.dumps(r) for r in rows)


def _root_key(root):
    if root is None or root == "hub":
        return root
    return os.path.abspath(os.fspath(root))


# --------------------------------------------------------------------------------------------
# authors and subjects
# --------------------------------------------------------------------------------------------

_PARTICLES = frozenset({"van", "von", "der", "den", "de", "del", "della", "da", "das", "dos", "du",
                        "di", "la", "le", "bin", "ibn", "y", "al", "el", "ter", "ten"})
# a word (letters, inner hyphens/apostrophes: "Al-Kuwaiti", "O'Donnell") or a parenthesised
# capitalised word (a nickname: "Alejandro (Alex) Fuentes")
_WORD_RE = re.compile(r"\([^\W\d_]\w*\)|[^\W\d_]\w*(?:[-'’]\w+)*")
_MIN_NAME_TEXTS = 10  # of the 40 texts of a block


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
    return _find(text, span) is not None


def _find(text: str, span: str) -> Optional[tuple[int, int]]:
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
    if score[best] < _MIN_NAME_TEXTS * len(rows) / QA_PER_AUTHOR:
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
    if _find(question, name):
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


@functools.lru_cache(maxsize=8)
def _block_authors(source: str, root_key) -> tuple:
    rows = [json.loads(s) for s in _raw(source, root_key)]
    if len(rows) % QA_PER_AUTHOR:
        raise ValueError(f"TOFU split {source!r} has {len(rows)} rows, not a multiple of {QA_PER_AUTHOR}: "
                         "cannot split it into author blocks")
    return tuple(block_author(rows[b:b + QA_PER_AUTHOR]) for b in range(0, len(rows), QA_PER_AUTHOR))


def _add_subjects(name: str, rows: list[dict], root_key) -> list[dict]:
    source, offset = _SPLITS[name][2]
    src = [json.loads(s) for s in _raw(source, root_key)]
    if offset + len(rows) > len(src):
        raise ValueError(f"TOFU split {name!r} has {len(rows)} rows but {source} has only {len(src)} "
                         f"after offset {offset}; pass subjects=False for a split of another layout")
    authors = _block_authors(source, root_key)
    for i, r in enumerate(rows):
        g = offset + i
        if src[g]["question"] != r["question"]:
            raise ValueError(f"TOFU split {name!r} row {i} is not {source}[{g}] (questions differ), so its "
                             "author cannot be derived; pass subjects=False for a split of another layout")
        a = authors[g // QA_PER_AUTHOR]
        subj, how = find_subject(r["question"], a)
        r.update(global_index=g if source == "full" else None, author_index=g // QA_PER_AUTHOR, author=a,
                 subject=subj, subject_source="question" if subj is not None else "absent",
                 subject_match=how)
    return rows


def load_split(name: str, root=None, subjects: bool = True) -> list[dict]:
    """Rows of TOFU split `name` as fresh dicts (one per row, file order).

    root: None = the packaged copy; a folder path = the same file names there; "hub" = HF
          `datasets.load_dataset("locuslab/TOFU", name, split="train")` (needs network).
    subjects: add `index` (row number in the split) and, for splits of the fictitious authors,
          global_index / author_index / author / subject / subject_source / subject_match (module
          docstring). `idontknow` rows are {"text": line}.
    Raises ValueError for an unknown split or a malformed row (naming file and line) and
    FileNotFoundError for a missing file.
    """
    _check_name(name)
    key = _root_key(root)
    rows = [json.loads(s) for s in _raw(name, key)]
    for i, r in enumerate(rows):
        r["index"] = i
    if subjects and _SPLITS[name][2] is not None:
        rows = _add_subjects(name, rows, key)
    return rows


# full.json rows that no evaluation reads: retain_perturbed is full[:400] and forget10 (the largest
# forget set) is full[-400:], so full[400:3600] is free for calibration and retain anchors.
CALIBRATION_RANGE = (400, N_FULL - 400)


def calibration_rows(root=None, subjects: bool = True) -> list[dict]:
    """Rows of full.json that no evaluation set contains (full[400:3600], 160 retain authors): the
    rows a method may calibrate on (gate thresholds, covariances, retain anchors). Every split's
    forget set and retain_perturbed are disjoint from them (tests/test_tofu.py checks)."""
    lo, hi = CALIBRATION_RANGE
    return load_split("full", root=root, subjects=subjects)[lo:hi]


def with_subject(rows: Sequence[dict], what: str = "tracing/editing") -> list[dict]:
    """Keep rows whose question names its author (`subject` set); warn with the number dropped."""
    keep = [r for r in rows if r.get("subject") is not None]
    if len(keep) < len(rows):
        warnings.warn(f"{len(rows) - len(keep)} of {len(rows)} TOFU rows do not name their author in the "
                      f"question (subject=None) and are skipped for {what}", stacklevel=2)
    return keep


# --------------------------------------------------------------------------------------------
# character and token spans
# --------------------------------------------------------------------------------------------

def subject_char_span(question: str, subject: str) -> tuple[int, int]:
    """[start, end) of the first word-bounded occurrence of `subject` in `question`."""
    span = _find(question, subject) if subject else None
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


def prompt_token_positions(tokenizer, question: str, span: tuple[int, int]) -> tuple[list[int], list[int]]:
    """(tokenizer.encode(format_prompt(question)), the contiguous positions of the tokens that overlap
    the characters span = (start, end) of `question`)."""
    shift = PROMPT_TEMPLATE.index("{question}")
    ids, offs = token_offsets(tokenizer, format_prompt(question))
    a, b = token_span(offs, (span[0] + shift, span[1] + shift))
    return ids, list(range(a, b))


def subject_span(question: str, subject: str) -> tuple[int, int]:
    """Character span of `subject` in `question`; ValueError "subject '...' not found in prompt '...'"
    when it is absent."""
    qspan = _find(question, subject) if subject else None
    if qspan is None:
        raise ValueError(f"subject {subject!r} not found in prompt {format_prompt(question)!r}")
    return qspan


def subject_token_positions(tokenizer, question: str, subject: str) -> list[int]:
    """Token positions of `subject` inside `tokenizer.encode(format_prompt(question))`.

    Returns the contiguous positions [first, ..., last] of the tokens that overlap the subject's
    characters. Raises ValueError "subject '...' not found in prompt '...'" when it is absent.
    """
    return prompt_token_positions(tokenizer, question, subject_span(question, subject))[1]
