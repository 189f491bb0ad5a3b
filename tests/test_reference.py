"""FQ reference per split (tofu.models / tofu.reference), FQ aggregation over seeds, spread row
selection and the protocols; the packaged-model checks use the real assets, the rest tmp folders."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from timerome_jax.tofu import metrics as M
from timerome_jax.tofu import models
from timerome_jax.tofu import reference as R
from timerome_jax.tofu.evaluate import spread_rows
from timerome_jax.tofu.protocol import FULL, QUICK, fit_gen_length, sampler_for
from timerome_jax.tofu.report import compare, markdown_table


def test_spread_rows_cover_every_author():
    rows = spread_rows(400, 40)  # retain_perturbed: 20 authors x 20 questions
    assert len(rows) == 40 and rows == sorted(set(rows))
    assert np.bincount(np.array(rows) // 20).tolist() == [2] * 20
    assert spread_rows(40, 40) == list(range(40)) and spread_rows(40, None) == list(range(40))
    assert np.bincount(np.array(spread_rows(200, 40)) // 20).tolist() == [4] * 10  # forget05: 10 authors
    assert spread_rows(117, 2) == [29, 87]
    with pytest.raises(ValueError, match="limit must be None or >= 1"):
        spread_rows(10, -1)


def test_pooled_forget_quality_by_hand():
    rng = np.random.default_rng(0)
    tr = np.exp(rng.normal(0.3, 0.5, (3, 40)))       # 3 seeds x 40 forget rows
    ref = np.exp(rng.normal(0.0, 0.5, (2, 40)))      # the reference at 2 seeds
    gm, gm_ref = np.exp(np.log(tr).mean(0)), np.exp(np.log(ref).mean(0))
    want = stats.ks_2samp(gm, gm_ref).pvalue
    assert M.pooled_forget_quality(tr, ref) == pytest.approx(want, rel=1e-12)
    # per seed it is the plain TOFU p-value; the pooled one is not the mean of those
    per_seed = [stats.ks_2samp(tr[s], ref[0]).pvalue for s in range(3)]
    assert [M.forget_quality(tr[s], ref[0]) for s in range(3)] == pytest.approx(per_seed)
    assert M.pooled_forget_quality(tr, ref) != pytest.approx(np.mean(per_seed))
    # one seed on each side: exactly TOFU's single test; n stays the number of rows
    assert M.pooled_forget_quality(tr[0], ref[0]) == pytest.approx(stats.ks_2samp(tr[0], ref[0]).pvalue)
    # identical sets -> p = 1; a transform of TR (1/TR, as legacy TOFU) gives the same p-value
    assert M.pooled_forget_quality(tr, tr) == pytest.approx(1.0)
    assert M.pooled_forget_quality(1 / tr, 1 / ref) == pytest.approx(want)
    with pytest.raises(ValueError, match=r"\[S, n\] and \[S', n\]"):
        M.pooled_forget_quality(tr, ref[:, :39])
    with pytest.raises(ValueError, match="finite and > 0"):
        M.pooled_forget_quality(-tr, ref)


def test_report_never_averages_forget_quality():
    res = {"seeds": [0, 1, 2], "per_seed": {},
           "metrics": {"forget_lp": [-3.0, -4.0, -5.0], "forget_quality": [0.9, 0.01, 0.2]},
           "forget_quality_pooled": {"agg_value": 0.0421}}
    other = {"forget_lp": {0: -2.0, 1: -3.0, 2: -4.0}, "forget_quality": {0: 0.5, 1: 0.6, 2: 0.7}}
    rows = compare({"no_edit": other, "edit": res})
    fq = next(r for r in rows if r["method"] == "edit" and r["metric"] == "forget_quality")
    assert fq["mean"] is None and fq["ci_lo"] is None and fq["delta"] is None and fq["t"] is None
    assert fq["pooled"] == 0.0421 and fq["values"] == [0.9, 0.01, 0.2] and fq["aggregation"] == "pooled"
    assert next(r for r in rows if r["method"] == "no_edit" and r["metric"] == "forget_quality")["pooled"] is None
    lp = next(r for r in rows if r["method"] == "edit" and r["metric"] == "forget_lp")
    assert lp["mean"] == pytest.approx(-4.0) and lp["delta"] == pytest.approx(-1.0)
    md = markdown_table(rows, "no_edit")
    assert "0.042 (per seed: 0.900, 0.010, 0.200)" in md and "never averaged" in md
    assert "0.370" not in md  # the mean of the three p-values appears nowhere


def test_packaged_references_match_their_split():
    folder = models.retain_model_for("forget01")
    assert models.retain_split_of(folder) == "retain99" and not models.truth_ratios_only(folder)
    assert folder in models.PACKAGED_REFERENCES["retain99"]
    # forget05/10 get their own packaged reference, never the retain99 one: truth ratios only
    for split, want in (("forget05", "retain95"), ("forget10", "retain90")):
        other = models.retain_model_for(split)
        assert other.name == f"tofu_{want}" and models.retain_split_of(other) == want
        assert models.truth_ratios_only(other) and not (other / "config.json").exists()
        assert R.resolve_reference(split)["model"] == str(other)
        # the shipped settings of `timerome eval`'s quick protocol serve FQ without any weights
        tr = R.cached_retain_tr(Path("/nonexistent"), split, QUICK.seeds, QUICK.n_mc, limit=QUICK.limit,
                                loader=lambda p: pytest.fail("no model may be loaded"))
        assert set(tr) == {str(s) for s in QUICK.seeds} and len(tr[str(QUICK.seeds[0])]) == QUICK.limit


def test_truth_ratio_only_reference(tmp_path):
    ref = tmp_path / "tofu_retain95"
    (ref / "reference").mkdir(parents=True)
    models.write_reference_info(ref, "retain95", weights_packaged=False)
    assert models.truth_ratios_only(ref)
    keys = [str(i) for i in spread_rows(200, 4)]
    payload = {"kind": "timerome_retain_forget_tr", "split": "forget05", "n_mc": 2, "estimator": "auto",
               "limit": 4, "retain_split": "retain95", "by_seed": {"0": {k: 1.0 + int(k) for k in keys}}}
    (ref / "reference" / R.retain_tr_cache_path(".", "forget05", 2).name).write_text(json.dumps(payload))
    no_load = lambda p: pytest.fail("no model may be loaded")  # noqa: E731
    got = R.cached_retain_tr(tmp_path / "out", "forget05", [0], 2, retain_model=str(ref), limit=4, loader=no_load)
    assert got == {"0": payload["by_seed"]["0"]}
    # another setting cannot be computed without weights: a clear error naming what is shipped
    with pytest.raises(models.MissingReferenceError,
                       match=r"ships only its forget truth ratios \(forget05 n_mc=2 limit=4 seeds 0\), not for "
                             r"n_mc=2, limit=4, estimator='auto', seeds \[1\].*train_reference.py retain95"):
        R.cached_retain_tr(tmp_path / "out", "forget05", [0, 1], 2, retain_model=str(ref), limit=4, loader=no_load)


@pytest.fixture
def fake_assets(tmp_path, monkeypatch):
    """Packaged-reference folders in tmp: retain99 present (recorded), retain95 absent,
    retain90 present but recording retain99 (a packaging mistake)."""
    r99, r95, r90 = tmp_path / "tofu_retain99", tmp_path / "tofu_retain95", tmp_path / "tofu_retain90"
    for d in (r99, r90):
        d.mkdir()
        (d / "config.json").write_text("{}")
    models.write_reference_info(r99, "retain99")
    models.write_reference_info(r90, "retain99")
    monkeypatch.setattr(models, "PACKAGED_REFERENCES", {"retain99": (r99,), "retain95": (r95,), "retain90": (r90,)})
    return r99, r95, r90


def test_reference_selection_and_mismatch(fake_assets, tmp_path):
    r99, r95, r90 = fake_assets
    assert models.retain_model_for("forget01") == r99
    assert json.loads((r99 / models.REFERENCE_INFO).read_text())["forget_split"] == "forget01"
    with pytest.raises(models.MissingReferenceError, match=r"no packaged retain95 reference model for forget05"):
        models.retain_model_for("forget05")
    with pytest.raises(models.ReferenceMismatchError,
                       match=r"forget10: the reference .* was trained on retain99, but forget10's Forget "
                             r"Quality needs a model trained on retain90"):
        models.retain_model_for("forget10")
    # an explicit folder: checked; override -> recorded
    with pytest.raises(models.ReferenceMismatchError, match="forget05: .*retain99.*retain95"):
        R.resolve_reference("forget05", str(r99))
    rec = R.resolve_reference("forget05", str(r99), override=True)
    assert rec["reference_override"] is True and rec["retain_split"] == "retain99" and rec["expected"] == "retain95"
    assert R.resolve_reference("forget01", str(r99), override=True)["reference_override"] is False  # it matches
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(models.ReferenceMismatchError, match="does not record its retain set"):
        R.resolve_reference("forget01", str(bare))
    # no reference for forget05: cached_retain_tr gives None (FQ None) and says why, never retain99
    record = {}
    assert R.cached_retain_tr(tmp_path / "out", "forget05", [0], 2, record=record,
                              loader=lambda p: pytest.fail("no model may be loaded")) is None
    assert record["model"] is None and "retain95" in record["message"]
    with pytest.raises(ValueError, match="expected kind"):
        (bare / models.REFERENCE_INFO).write_text('{"kind": "x"}')
        models.reference_info(bare)


def test_reference_tr_file_checks_its_retain_set(tmp_path):
    path = tmp_path / "tr.json"
    path.write_text(json.dumps({"kind": "timerome_retain_forget_tr", "split": "forget05", "retain_split": "retain99",
                                "by_seed": {"0": {"0": 1.0}}}))
    with pytest.raises(models.ReferenceMismatchError, match="forget05: .*retain99.*retain95"):
        R.load_reference_tr(path, "forget05")
    by_seed, rec = R.load_reference_tr(path, "forget05", override=True)
    assert by_seed == {"0": {"0": 1.0}} and rec["reference_override"] is True
    with pytest.raises(ValueError, match="forget05's forget set, not forget01's"):
        R.load_reference_tr(path, "forget01")


def test_protocols():
    assert (FULL.limit, FULL.n_mc, FULL.seeds) == (None, 16, (0, 1, 2, 3, 4))
    assert fit_gen_length(256, 79, 16) == 176 and fit_gen_length(512, 79, 16) == 200
    s = sampler_for(FULL, 176)
    assert (s.steps, s.block_length, s.temperature) == (176, 16, 0.0)
    assert sampler_for(FULL, 200).block_length == 10
    assert (QUICK.limit, QUICK.n_mc, sampler_for(QUICK, 128).steps) == (40, 8, 32)
    with pytest.raises(ValueError, match="no room to generate"):
        fit_gen_length(64, 60, 16)


@pytest.mark.slow
def test_full_protocol_script_smoke(tmp_path):
    """experiments/full_protocol.py on the packaged models at a tiny size: files, reference, FQ."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "full_protocol.py"
    spec = importlib.util.spec_from_file_location("full_protocol", path)
    fp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fp)
    out = tmp_path / "fp"
    s = fp.main(["--out", str(out), "--splits", "forget01", "--limit", "2", "--n-mc", "2", "--seeds", "0", "1",
                 "--gen-length", "8", "--batch-size", "8", "--gen-batch-size", "8", "--no-progress"])
    e = s["splits"]["forget01"]
    assert e["reference"]["trained_on"] == "retain99" and s["protocol_overrides"] == ["limit", "n_mc", "seeds", "gen_length"]
    tgt = json.loads((out / "forget01_target.json").read_text())
    ref = json.loads((out / "forget01_reference.json").read_text())
    keys = list(tgt["per_seed"]["0"]["forget_tr"]["value_by_index"])
    mine = [[tgt["per_seed"][str(sd)]["forget_tr"]["value_by_index"][k]["score"] for k in keys] for sd in (0, 1)]
    theirs = [[ref["per_seed"][str(sd)]["forget_tr"]["value_by_index"][k]["score"] for k in keys] for sd in (0, 1)]
    assert e["target"]["metrics"]["forget_quality_pooled"] == pytest.approx(M.pooled_forget_quality(mine, theirs))
    assert e["target"]["metrics"]["forget_quality_per_seed"] == pytest.approx(
        [stats.ks_2samp(mine[i], theirs[i]).pvalue for i in (0, 1)])
    tr = json.loads(next((out / "references").glob("*/reference/retain_forget_tr_forget01_nmc2_auto.json")).read_text())
    assert tr["retain_split"] == "retain99" and set(tr["by_seed"]) == {"0", "1"}
    assert "never averaged" in (out / "summary.md").read_text() and (out / "forget01.md").is_file()
