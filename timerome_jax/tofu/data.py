"""TOFU (Task of Fictitious Unlearning): one loader for every split, and the prompt format.

Data: the copy packaged in `timerome_jax/data/tofu/` (MIT, CMU Locus Lab; provenance and sha256 in
its README), any local folder with the same file names (`root=PATH`), or the HF hub
(`root="hub"`, `datasets.load_dataset("locuslab/TOFU", name)`).

Structure used here (verified on the packaged files, see tests/test_tofu.py):
  full = 200 fictitious authors x 20 QA, in author order. forget01/05/10 = full[-40:], [-200:],
  [-400:] (the last 2/10/20 authors); retain99/95/90 = the rest; retain_perturbed = full[:400];
  forgetXX_perturbed has the rows of forgetXX in the same order. holdout01/05/10 = the first
  2/10/20 authors of holdout10, 20 QA each, authors that are not in full.

Subjects: with `subjects=True` every row of the fictitious-author splits gets author, subject,
subject_source, subject_match, author_index and global_index; how they are found, and how many
questions name their author, is in `timerome_jax.tofu.subjects`.

Prompt format: `PROMPT_TEMPLATE = "Question: {question}\\nAnswer: "` (the format the packaged
target/retain models were trained with; TOFU's phi format). Answers are scored as
encode(answer) + [eos] (TOFU counts the end token in |a|).
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import os
import warnings
from typing import Optional, Sequence

from timerome_jax.tofu.subjects import block_author, find_span, find_subject, token_offsets, token_span

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
    except ImportError as e:  # optional: the `hub` extra
        raise RuntimeError("root='hub' needs the `datasets` package: pip install 'timerome-jax[hub]'") from e
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
# token positions of a subject inside the prompt
# --------------------------------------------------------------------------------------------

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
    qspan = find_span(question, subject) if subject else None
    if qspan is None:
        raise ValueError(f"subject {subject!r} not found in prompt {format_prompt(question)!r}")
    return qspan


def subject_token_positions(tokenizer, question: str, subject: str) -> list[int]:
    """Token positions of `subject` inside `tokenizer.encode(format_prompt(question))`.

    Returns the contiguous positions [first, ..., last] of the tokens that overlap the subject's
    characters. Raises ValueError "subject '...' not found in prompt '...'" when it is absent.
    """
    return prompt_token_positions(tokenizer, question, subject_span(question, subject))[1]
