"""TOFU loader: counts, slicing facts, subjects, spans, errors."""
import collections
import hashlib
import importlib.resources
import json

import pytest

from conftest import tofu_tokenizer

from timerome_jax.tofu import data as tofu
from timerome_jax.tofu import subjects

COUNTS = {"full": 4000, "forget01": 40, "forget05": 200, "forget10": 400, "retain99": 3960,
          "retain95": 3800, "retain90": 3600, "holdout01": 40, "holdout05": 200, "holdout10": 400,
          "forget01_perturbed": 40, "forget05_perturbed": 200, "forget10_perturbed": 400,
          "retain_perturbed": 400, "real_authors": 100, "real_authors_perturbed": 100,
          "world_facts": 117, "world_facts_perturbed": 117, "idontknow": 100}


def qa(rows):
    return [(r["question"], r["answer"]) for r in rows]


def test_every_split_loads_with_its_count():
    assert set(COUNTS) == set(tofu.SPLITS)
    for name, n in COUNTS.items():
        assert len(tofu.load_split(name, subjects=False)) == n, name


def test_packaged_files_match_the_readme_checksums():
    pkg = importlib.resources.files("timerome_jax.data").joinpath("tofu")
    readme = pkg.joinpath("README.md").read_text(encoding="utf-8")
    sums = dict(l.split()[::-1] for l in readme.split("## sha256")[1].splitlines()
                if len(l.split()) == 2 and len(l.split()[0]) == 64)
    assert len(sums) == 19
    for fname, digest in sums.items():
        assert hashlib.sha256(pkg.joinpath(fname).read_bytes()).hexdigest() == digest, fname
    assert "Copyright (c) 2024 CMU Locus Lab" in pkg.joinpath("LICENSE").read_text()


def test_slicing_facts():
    full = qa(tofu.load_split("full"))
    for p, n in (("01", 40), ("05", 200), ("10", 400)):
        assert qa(tofu.load_split(f"forget{p}")) == full[-n:]
        assert qa(tofu.load_split(f"retain{100 - int(p)}")) == full[:-n]
        assert qa(tofu.load_split(f"forget{p}_perturbed")) == full[-n:]
    assert qa(tofu.load_split("retain_perturbed")) == full[:400]
    fq = {q for q, _ in full}
    assert not any(r["question"] in fq for r in tofu.load_split("holdout10"))
    assert qa(tofu.load_split("holdout01")) == qa(tofu.load_split("holdout10"))[:40]
    for r in tofu.load_split("forget10_perturbed"):
        assert len(r["perturbed_answer"]) == 5 and isinstance(r["paraphrased_answer"], str)
    for r in tofu.load_split("world_facts_perturbed"):
        assert len(r["perturbed_answer"]) == 3
    assert tofu.load_split("idontknow")[0] == {"text": "I'm not certain about that.", "index": 0}


def test_global_indices_and_fresh_copies():
    f1 = tofu.load_split("forget01")
    assert [r["global_index"] for r in f1] == list(range(3960, 4000))
    assert [r["author_index"] for r in f1] == [198] * 20 + [199] * 20
    f1[0]["question"] = "changed"
    assert tofu.load_split("forget01")[0]["question"] != "changed"


def test_subjects_on_forget01_by_hand():
    f1 = tofu.load_split("forget01")
    assert {r["author"] for r in f1} == {"Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov"}
    # row 0 asks for the name: "What is the full name of the author born in Kuwait City, ...?"
    assert f1[0]["subject"] is None and f1[0]["subject_source"] == "absent"
    assert f1[1]["question"] == "What gender is author Basil Mahfouz Al-Kuwaiti?"
    assert f1[1]["subject"] == "Basil Mahfouz Al-Kuwaiti" and f1[1]["subject_source"] == "question"
    # possessive: "Can you tell me about the occupations of Basil Mahfouz Al-Kuwaiti's parents?"
    assert f1[3]["subject"] == "Basil Mahfouz Al-Kuwaiti"
    assert f1[20]["subject"] is None  # "Who is the notable author born in Astana, ...?"
    assert f1[21]["subject"] == "Nikolai Abilov"
    for r in f1:
        if r["subject"] is not None:
            s, e = subjects.subject_char_span(r["question"], r["subject"])
            assert r["question"][s:e] == r["subject"]


def test_subject_rules_on_full():
    full = tofu.load_split("full")
    assert full[7]["subject"] == "Jamie Vasquez" and full[7]["subject_match"] == "fuzzy"  # data typo
    assert full[207]["subject"] == "Grimkov" and full[207]["subject_match"] == "partial"
    assert full[2]["subject"] == "Jaime Vasquez"  # not "Lorenzo Vasquez" (the father, in the answer)
    assert full[72 * 20]["subject"] == "Alejandro (Alex) Fuentes"
    assert full[33 * 20]["author"] == "Tan Yu Liang"
    assert full[65 * 20]["author"] == "Isabella van Pletzen"
    assert all(r["author"] is None and r["subject"] is None for r in full[88 * 20: 89 * 20])


def test_subject_coverage_numbers_in_the_docstring():
    def cover(name):
        rows = tofu.load_split(name)
        return sum(r["subject"] is not None for r in rows), collections.Counter(r["subject_match"] for r in rows)

    assert cover("forget01") == (38, {"exact": 38, None: 2})
    assert cover("forget05") == (190, {"exact": 189, "partial": 1, None: 10})
    assert cover("forget10") == (379, {"exact": 377, "partial": 2, None: 21})
    assert cover("full") == (3795, {"exact": 3779, "fuzzy": 3, "partial": 13, None: 205})
    assert cover("holdout10")[0] == 394
    assert cover("retain_perturbed")[0] == 385
    for n in ("forget01", "forget05", "forget10", "full"):
        assert f"{n}:" in subjects.__doc__
    with pytest.warns(UserWarning, match="2 of 40"):
        assert len(tofu.with_subject(tofu.load_split("forget01"))) == 38


def test_prompt_template():
    assert tofu.PROMPT_TEMPLATE == "Question: {question}\nAnswer: "
    assert tofu.format_prompt("Who?") == "Question: Who?\nAnswer: "


def test_token_span_from_offsets():
    offs = [(0, 0), (0, 8), (8, 9), (9, 14), (14, 20), (20, 21)]
    assert subjects.token_span(offs, (9, 20)) == (3, 5)
    assert subjects.token_span(offs, (10, 15)) == (3, 5)  # partial overlaps count
    with pytest.raises(ValueError, match="no token"):
        subjects.token_span(offs, (30, 31))


class CharTok:
    """A toy tokenizer without offsets: one token per character (exercises the decode fallback)."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_subject_token_positions_fallback_and_hf(tiny_hf_tokenizer):
    q = "What gender is author Basil Mahfouz Al-Kuwaiti?"
    pos = tofu.subject_token_positions(CharTok(), q, "Basil Mahfouz Al-Kuwaiti")
    prompt = tofu.format_prompt(q)
    assert "".join(prompt[i] for i in pos) == "Basil Mahfouz Al-Kuwaiti"
    # HF fast tokenizer offsets: the tokens at the positions decode to the subject
    pos = tofu.subject_token_positions(tiny_hf_tokenizer, q, "Basil Mahfouz Al-Kuwaiti")
    ids = tiny_hf_tokenizer.encode(prompt)
    assert tiny_hf_tokenizer.decode(ids[pos[0]:pos[-1] + 1]).strip() == "Basil Mahfouz Al-Kuwaiti"
    assert pos == list(range(pos[0], pos[-1] + 1))
    with pytest.raises(ValueError, match="subject 'Nikolai Abilov' not found in prompt"):
        tofu.subject_token_positions(tiny_hf_tokenizer, q, "Nikolai Abilov")


def _copy_data(tmp_path, names):
    pkg = importlib.resources.files("timerome_jax.data").joinpath("tofu")
    for n in names:
        (tmp_path / n).write_bytes(pkg.joinpath(n).read_bytes())


def test_local_root_and_errors(tmp_path):
    _copy_data(tmp_path, ["full.json", "forget01.json", "world_facts_perturbed.json"])
    rows = tofu.load_split("forget01", root=tmp_path)
    assert rows == tofu.load_split("forget01")
    with pytest.raises(ValueError, match="unknown TOFU split 'forget02'"):
        tofu.load_split("forget02")
    with pytest.raises(FileNotFoundError, match="forget05.json"):
        tofu.load_split("forget05", root=tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (tmp_path / "world_facts_perturbed.json").read_text().splitlines()
    (bad / "world_facts_perturbed.json").write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]))
    with pytest.raises(ValueError, match=r"world_facts_perturbed.json line 3: not valid JSON"):
        tofu.load_split("world_facts_perturbed", root=bad)
    r = json.loads(lines[4])
    del r["perturbed_answer"]
    (bad / "world_facts_perturbed.json").write_text("\n".join(lines[:4] + [json.dumps(r)] + lines[5:]))
    with pytest.raises(ValueError, match=r"line 5: missing field 'perturbed_answer'"):
        tofu.load_split("world_facts_perturbed", root=bad)
    # a forget file that is not the tail of full cannot get subjects
    (bad / "full.json").write_text((tmp_path / "full.json").read_text())
    (bad / "forget01.json").write_text("\n".join((tmp_path / "full.json").read_text().splitlines()[:40]))
    with pytest.raises(ValueError, match="not full"):
        tofu.load_split("forget01", root=bad)
    assert len(tofu.load_split("forget01", root=bad, subjects=False)) == 40


def test_hub_idontknow_is_rejected_without_network():
    with pytest.raises(ValueError, match="not a config"):
        tofu.load_split("idontknow", root="hub")


@pytest.fixture(scope="module")
def tiny_hf_tokenizer():
    return tofu_tokenizer()


def test_calibration_rows_are_disjoint_from_every_evaluation_set():
    cal = {(r["question"], r["answer"]) for r in tofu.calibration_rows(subjects=False)}
    assert len(cal) == 3200
    evaluated = ["retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"] + \
        [f"{s}_perturbed" for s in tofu.FORGET_SPLITS] + list(tofu.FORGET_SPLITS)
    for name in evaluated:
        rows = tofu.load_split(name, subjects=False)
        assert not cal & {(r["question"], r["answer"]) for r in rows}, name
