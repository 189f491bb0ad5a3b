"""Inference-time baselines (act_steer, rmu_like) and the method registry on a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timerome_jax import methods
from timerome_jax.backbone import model
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.baselines import inference, registry
from timerome_jax.compare_methods import costs_markdown, parse_method, pareto_plot, retain_anchor_rows
from timerome_jax.tofu import data as tofu

FORGET = [{"question": f"Who wrote the novel number {i}?", "answer": f"The novel was written by author {i}."}
          for i in range(6)]
RETAIN = [{"question": f"What is fact {i}?", "answer": f"The quick brown fox {i} jumps."} for i in range(6)]


@pytest.mark.slow  # row activations + edited forward on the tiny HF model
def test_act_steer_is_difference_of_means_and_changes_logits(tiny_llada):
    params, cfg, tok = tiny_llada
    edit, info = inference.act_steer(params, cfg, tok, FORGET, RETAIN, layer=0, alpha=2.0)
    hf = inference.row_activations(params, cfg, tok, FORGET, 0)
    hr = inference.row_activations(params, cfg, tok, RETAIN, 0)
    np.testing.assert_allclose(edit.v, hf.mean(0) - hr.mean(0), rtol=1e-5, atol=1e-6)
    h = jnp.ones((2, 3, cfg.d_model))
    np.testing.assert_allclose(edit.delta(h), np.broadcast_to(-2.0 * np.asarray(edit.v), (2, 3, cfg.d_model)), rtol=1e-6)
    toks = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    base = model.forward(params, toks, cfg)
    steered = model.forward(params, toks, cfg, intervene=Intervene(edit=edit))
    assert not np.allclose(base, steered)


def test_rmu_like_gate_separates_forget_from_retain(tiny_llada):
    params, cfg, tok = tiny_llada
    edit, info = inference.rmu_like(params, cfg, tok, FORGET, RETAIN, layer=1, coeff=1.0, temp=0.05, seed=0)
    assert info["forget_cos"] > info["tau"] > info["retain_cos"]
    gf = np.asarray(edit.gate(jnp.asarray(inference.row_activations(params, cfg, tok, FORGET, 1)))).mean()
    gr = np.asarray(edit.gate(jnp.asarray(inference.row_activations(params, cfg, tok, RETAIN, 1)))).mean()
    assert gf > gr
    h = jax.random.normal(jax.random.PRNGKey(0), (1, 4, cfg.d_model))
    d = np.asarray(edit.delta(h))
    # the push is along u with length gate * coeff * ||h||
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1),
                               np.asarray(edit.gate(h))[..., 0] * np.linalg.norm(np.asarray(h), axis=-1), rtol=1e-4)


def test_registry_prepares_inference_methods_and_reports_costs(tiny_llada):
    params, cfg, tok = tiny_llada
    task = methods.EditTask(params, cfg, tok, "forget01", FORGET, RETAIN, seed=0)
    for name in ("no_edit", "act_steer", "rmu_like"):
        p = methods.prepare(name, task)
        assert p.method == name and "prepare_s" in p.info and p.params is None
        assert (p.intervene is None) == (name == "no_edit")
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        registry.train_config("npo", cfg, betta=1.0)
    tc = registry.train_config("adaptive_rmu", cfg)
    assert tc.mode == "full" and tc.train_layers == (0, 1) and tc.rmu_layer == 1


def test_parse_method_and_anchor_rows():
    assert parse_method("timerome:alpha=0.5,q=2") == ("timerome", {"alpha": 0.5, "q": 2})
    assert parse_method("npo:targets=wq+wv,mode=full") == ("npo", {"targets": ("wq", "wv"), "mode": "full"})
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("nope")
    with pytest.raises(ValueError, match="key=value"):
        parse_method("npo:beta")
    cal = {r["question"] for r in tofu.calibration_rows()}
    rows = retain_anchor_rows(10)
    assert len(rows) == 10 and all(r["question"] in cal for r in rows)


def test_pareto_and_costs_outputs(tmp_path):
    rows = [{"method": "no_edit", "metric": "forget_lp", "delta": None, "delta_ci_lo": None, "delta_ci_hi": None},
            {"method": "no_edit", "metric": "retain_lp", "delta": None, "delta_ci_lo": None, "delta_ci_hi": None},
            {"method": "npo", "metric": "forget_lp", "delta": -3.0, "delta_ci_lo": -4.0, "delta_ci_hi": -2.0},
            {"method": "npo", "metric": "retain_lp", "delta": -0.5, "delta_ci_lo": -1.0, "delta_ci_hi": 0.0}]
    pareto_plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    md = costs_markdown({"npo": {"prepare_s": 1.5, "peak_bytes": None, "extra_bytes": 1024,
                                 "train": {"steps_kept": 3, "steps_run": 4, "step_s": 0.1, "stopped_early": True}}})
    assert "| npo | 1.500 |" in md and "3/4 steps kept" in md and "early stop" in md


@pytest.mark.slow
def test_run_compare_end_to_end_on_tiny_model(tiny_llada, tmp_path):
    from timerome_jax.compare_methods import CompareConfig, run_compare

    params, cfg, tok = tiny_llada
    ccfg = CompareConfig(seeds=(0, 1), n_mc=1, limit=2, batch_size=4, metrics=("forget_lp", "retain_lp"), mu=False,
                         n_retain=8)
    res = run_compare(params, cfg, tok, ["act_steer", "gd:steps=2,monitor_rows=2,batch_size=2"], tmp_path, ccfg,
                      progress=False)
    methods_ = [r["method"] for r in res["rows"]]
    assert methods_[0] == "no_edit" and set(methods_) == {"no_edit", "act_steer", "gd:steps=2,monitor_rows=2,batch_size=2"}
    gd = next(r for r in res["rows"] if r["method"].startswith("gd") and r["metric"] == "forget_lp")
    assert gd["n_paired"] == 2 and gd["delta"] is not None
    for f in res["files"].values():
        assert (tmp_path / f.split("/")[-1]).stat().st_size > 0
    assert res["info"]["gd:steps=2,monitor_rows=2,batch_size=2"]["train"]["steps_run"] == 2


def test_run_compare_budget_skips_then_resume_finishes(tiny_llada, tmp_path):
    from timerome_jax.compare_methods import CompareConfig, run_compare

    params, cfg, tok = tiny_llada
    ccfg = CompareConfig(seeds=(0,), n_mc=1, limit=2, batch_size=4, metrics=("forget_lp",), mu=False, n_retain=8)
    res = run_compare(params, cfg, tok, ["act_steer", "random_layer"], tmp_path, ccfg, progress=False, budget_s=1e-3)
    assert res["skipped"] == ["act_steer", "random_layer"]  # no_edit always runs
    assert "Pending: act_steer, random_layer" in (tmp_path / "table1.md").read_text()
    res = run_compare(params, cfg, tok, ["act_steer", "random_layer"], tmp_path, ccfg, progress=False)
    assert res["skipped"] == [] and {r["method"] for r in res["rows"]} == {"no_edit", "act_steer", "random_layer"}
