"""evaluate(): end to end on a tiny random model; compare/write_report (the CLI: test_cli.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scipy import stats

from timerome_jax.tofu import evaluate as E
from timerome_jax.tofu.report import compare, write_report
from timerome_jax.diffusion import likelihood
from timerome_jax.tofu import metrics as M
from timerome_jax.tofu import data as tofu
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.diffusion.sampler import SamplerConfig


@pytest.fixture(scope="module")
def tiny(tiny_tofu_llada):
    return tiny_tofu_llada


SCFG = SamplerConfig(steps=4, block_length=4, temperature=0.0)
# one length bucket for every batch: a single compiled ELBO shape per batch size (fast tests)
KW = dict(n_mc=2, limit=2, batch_size=8, gen_length=4, sampler=SCFG, progress=False, length_bucket=192)


@pytest.fixture(scope="module")
def run_all(tiny):
    params, cfg, tok = tiny
    # limit 2 reads rows 10 and 30 of forget01 (spread over the set): a dict per row, or a list by row
    retain_tr = {"0": {"10": 0.5, "30": 2.0}, "1": [0.7 if i == 10 else 0.9 if i == 30 else 5.0 for i in range(40)]}
    res = E.evaluate(params, cfg, tok, "forget01", metrics=("all",), seeds=(0, 1), retain_tr=retain_tr, **KW)
    return res, retain_tr


@pytest.mark.slow
def test_structure_and_metric_identities(tiny, run_all):
    res, retain_tr = run_all
    assert set(res["metrics"]) == set(E.ALL_METRICS)
    assert all(len(v) == 2 for v in res["metrics"].values())
    per = res["per_seed"]["0"]
    assert res["n_rows"] == {"forget": 2, "retain": 2, "ra": 2, "wf": 2} and res["row_selection"] == "spread"
    # 2 rows spread over each set: floor((i + 1/2) * n / 2)
    want = {"forget_lp": {"10", "30"}, "forget_tr": {"10", "30"}, "retain_prob": {"100", "300"},
            "ra_prob": {"25", "75"}, "wf_rouge": {"29", "87"}}
    for m, keys in want.items():
        assert set(per[m]["value_by_index"]) == keys
    lls = [v["ll"] for v in per["forget_lp"]["value_by_index"].values()]
    assert per["forget_lp"]["agg_value"] == pytest.approx(np.mean(lls))
    assert all(v < 0 for v in lls)
    ns = [v["n_tokens"] for v in per["forget_lp"]["value_by_index"].values()]
    tok = tiny[2]
    rows = tofu.load_split("forget01_perturbed")
    assert ns == [len(tok.encode(rows[i]["answer"])) + 1 for i in (10, 30)]  # EOS counted
    # prob = mean exp(ll / n); TR from the stored log-probs; MU = hmean of the nine
    assert per["forget_prob"]["agg_value"] == pytest.approx(np.mean(np.exp(np.array(lls) / np.array(ns))))
    trs = [v["score"] for v in per["forget_tr"]["value_by_index"].values()]
    v0 = per["forget_tr"]["value_by_index"]["10"]
    assert trs[0] == pytest.approx(np.exp(np.mean(v0["avg_ll_perturbed"]) - v0["avg_ll_ref"]))
    assert len(v0["avg_ll_perturbed"]) == 5
    assert per["forget_tr"]["agg_value"] == pytest.approx(np.mean(np.minimum(trs, 1 / np.array(trs))))
    rtr = [v["score"] for v in per["retain_tr"]["value_by_index"].values()]
    assert per["retain_tr"]["agg_value"] == pytest.approx(np.mean(np.maximum(0, 1 - np.array(rtr))))
    mu = stats.hmean([per[k]["agg_value"] for k in M.MU_KEYS]) if all(per[k]["agg_value"] > 0 for k in M.MU_KEYS) else 0.0
    assert per["model_utility"]["agg_value"] == pytest.approx(mu)
    # forget quality against the retain TRs of the matching seed (dict) / list (seed 1)
    assert per["forget_quality"]["agg_value"] == pytest.approx(stats.ks_2samp(trs, [0.5, 2.0]).pvalue)
    trs1 = [v["score"] for v in res["per_seed"]["1"]["forget_tr"]["value_by_index"].values()]
    assert res["metrics"]["forget_quality"][1] == pytest.approx(stats.ks_2samp(trs1, [0.7, 0.9]).pvalue)
    # pooled FQ: one KS test on the per-row geometric mean of TR over seeds, for both models
    gm = np.sqrt(np.array(trs) * np.array(trs1))
    gm_ref = np.sqrt(np.array([0.5, 2.0]) * np.array([0.7, 0.9]))
    pooled = res["forget_quality_pooled"]
    assert pooled["agg_value"] == pytest.approx(stats.ks_2samp(gm, gm_ref).pvalue)
    assert pooled["n_rows"] == 2 and pooled["retain_tr_seeds"] == [0, 1]
    # the two seeds use different masks; greedy generations are shared
    assert res["metrics"]["forget_lp"][0] != res["metrics"]["forget_lp"][1]
    assert set(res["generations"]) == {"shared"}
    assert res["metrics"]["forget_rouge"][0] == res["metrics"]["forget_rouge"][1]
    json.dumps(res)  # serialisable


@pytest.mark.slow
def test_item_score_equals_a_direct_elbo_call(tiny, run_all):
    params, cfg, tok = tiny
    res, _ = run_all
    r = tofu.load_split("forget01_perturbed")[30]
    toks, am, pm = likelihood.make_qa_batch([tok.encode(tofu.format_prompt(r["question"]))],
                                            [tok.encode(r["answer"]) + [tok.eos_id]], cfg)
    eid = (1 * 100_000 + 3990) * 8 + 0  # question 3990 of full.json, variant 0 (the answer)
    ll = likelihood.elbo(params, cfg, toks, am, pm, jax.random.PRNGKey(0), n_mc=2, example_ids=np.array([eid]))
    got = res["per_seed"]["0"]["forget_lp"]["value_by_index"]["30"]["ll"]
    assert got == pytest.approx(float(ll[0]), rel=1e-5, abs=1e-4)


@pytest.mark.slow
def test_determinism_batching_and_zero_intervention(tiny):
    params, cfg, tok = tiny
    kw = dict(KW, metrics=("forget_lp", "forget_tr", "forget_rouge"), seeds=(3,))
    a = E.evaluate(params, cfg, tok, "forget01", **kw)
    b = E.evaluate(params, cfg, tok, "forget01", **kw)
    assert a["per_seed"] == b["per_seed"] and a["generations"] == b["generations"]
    # a different batch size changes shapes, not the per-example masks
    c = E.evaluate(params, cfg, tok, "forget01", **dict(kw, batch_size=3))
    np.testing.assert_allclose(c["metrics"]["forget_lp"], a["metrics"]["forget_lp"], rtol=1e-5)
    z = Intervene(noise=jnp.zeros((1, 1, cfg.d_model), jnp.float32))
    d = E.evaluate(params, cfg, tok, "forget01", intervene=z, **kw)
    assert d["per_seed"] == a["per_seed"] and d["generations"] == a["generations"]
    assert d["intervened"] and not a["intervened"]
    # a non-zero intervention changes the scores (it is really passed through)
    n = Intervene(noise=jnp.full((1, 1, cfg.d_model), 0.5, jnp.float32))
    e = E.evaluate(params, cfg, tok, "forget01", intervene=n, **dict(kw, metrics=("forget_lp",)))
    assert e["metrics"]["forget_lp"] != a["metrics"]["forget_lp"]


@pytest.mark.slow
def test_metric_names_and_errors(tiny):
    assert E.expand_metrics(["table1"]) == ("forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_quality")
    assert E.expand_metrics(["prob", "forget_prob"]) == ("forget_prob", "retain_prob", "ra_prob", "wf_prob")
    with pytest.raises(ValueError, match="unknown metric 'forget_loss'"):
        E.expand_metrics(["forget_loss"])
    params, cfg, tok = tiny
    with pytest.raises(ValueError, match="split must be one of"):
        E.evaluate(params, cfg, tok, "retain90", **KW)
    res = E.evaluate(params, cfg, tok, "forget01", metrics=("forget_quality",), **dict(KW, limit=1))
    assert res["metrics"] == {"forget_quality": [None]}  # no retain TRs given
    with pytest.raises(ValueError, match="no truth ratio for forget rows"):
        E.evaluate(params, cfg, tok, "forget01", metrics=("forget_quality",), retain_tr={"5": 1.0}, **dict(KW, limit=1))


def test_compare_and_report(tmp_path):
    no_edit = {"forget_lp": {0: -35.0, 1: -36.0, 2: -34.0}, "retain_lp": {0: -30.0, 1: -31.0, 2: -29.0}}
    edit = {"forget_lp": {0: -80.0, 1: -84.0, 2: -79.0}, "retain_lp": {0: -30.5, 1: -31.0, 2: -29.5, 3: -1.0}}
    rows = compare({"no_edit": no_edit, "timerome": edit})
    r = next(x for x in rows if x["method"] == "timerome" and x["metric"] == "forget_lp")
    d = np.array([-45.0, -48.0, -45.0])
    assert r["mean"] == pytest.approx(-81.0) and r["std"] == pytest.approx(np.std([-80, -84, -79], ddof=1))
    assert r["delta"] == pytest.approx(d.mean())
    ref = stats.ttest_rel([-80.0, -84.0, -79.0], [-35.0, -36.0, -34.0])
    assert (r["t"], r["p"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    assert r["sig"] == M.significance(ref.pvalue) and r["sig"] in ("**", "***")
    assert (r["ci_lo"], r["ci_hi"]) == M.bootstrap_ci([-80.0, -84.0, -79.0])
    assert (r["delta_ci_lo"], r["delta_ci_hi"]) == M.bootstrap_ci(d)
    r2 = next(x for x in rows if x["method"] == "timerome" and x["metric"] == "retain_lp")
    assert r2["n"] == 4 and r2["n_paired"] == 3  # seed 3 has no reference
    r0 = next(x for x in rows if x["method"] == "no_edit" and x["metric"] == "forget_lp")
    assert r0["delta"] is None and r0["p"] is None
    js, md = write_report(rows, tmp_path / "rep", "table1")
    assert json.loads(js.read_text()) == json.loads(json.dumps(rows))
    text = md.read_text()
    assert "| timerome |" in text and "| no_edit |" in text and "ref" in text
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="reference method 'no_edit'"):
        compare({"a": no_edit})
