"""The main job end to end on a tiny model: trace -> select -> install -> evaluate, files written
(the CLI: test_cli.py)."""
import dataclasses
import json

import numpy as np
import pytest

from timerome_jax.method import facts as F
from timerome_jax.method import capture as cap_lib
from timerome_jax.method import memory as mem_lib
from timerome_jax.method import memory_file
from timerome_jax import pipeline as pl
from timerome_jax.method import trace as tr


@pytest.fixture(scope="module")
def tiny(tiny_llada):
    return tiny_llada


@pytest.mark.slow
def test_demo_end_to_end(tiny, tmp_path):
    params, cfg, tok = tiny
    dcfg = pl.DemoConfig(n_trace=2, trace=tr.TraceConfig(steps=2, n_noise=1, chunk=6), seeds=(0, 1), n_mc=2,
                         limit=3, batch_size=4, metrics=("forget_lp", "retain_lp", "forget_tr"),
                         gate_rows=(40, 40))
    out = pl.demo(params, cfg, tok, tmp_path, dcfg, retain_model=None, progress=False)
    for name in ("heatmap.png", "tie.npz", "table.md", "table.json", "memory.npz", "demo.json"):
        assert (tmp_path / name).is_file(), name
    s = json.loads((tmp_path / "demo.json").read_text())
    assert s["n_facts"] == 40 and len(s["traced_facts"]) == 2
    z = np.load(tmp_path / "tie.npz")
    assert z["tie_bar"].shape == (2, 3, cfg.n_layers, 2)
    methods = {r["method"] for r in out["rows"]}
    assert methods == {"no_edit", "gated (a=4, q=4)", "paper_eq12 (a=4, q=4)"}
    eq12 = next(r for r in out["rows"] if r["method"].startswith("paper_eq12") and r["metric"] == "forget_lp")
    assert eq12["delta"] is not None and eq12["delta"] != 0.0  # the edit changes the scores
    mem, meta = memory_file.load(tmp_path / "memory.npz", expect_fingerprint=cap_lib.model_fingerprint(params, cfg))
    assert mem_lib.n_facts(mem) == 40 and meta["split"] == "forget01" and mem.gate is not None
    assert meta["gate"]["on"] and s["install"]["gated"]
    assert meta["gate"]["token"] is False and not mem.gate.token  # the latch default: no per-token gate


@pytest.mark.slow
def test_install_timings_and_errors(tiny, monkeypatch):
    params, cfg, tok = tiny
    facts = F.load_facts(tok, "forget01", tok.eos_id, limit=5)
    coord = tr.Coordinate(1, -1, 0)
    mem, info = pl.install(params, cfg, tok, facts, coord, alpha=1.0, q=2)
    assert info["n_facts"] == 5 and info["capture_s"] > 0 and info["solve_s"] > 0 and info["lam"] > 0
    assert int(mem.layer) == 1 and mem.module == 0
    # 5 facts: solved on the device behind the capture, equal to the host solve of the same keys
    assert info["solved_on"] == "device"
    cb = F.cloze_batch(facts, tok, cfg, pl.DEFAULT_TARGET)
    u, v_o, v_t = cap_lib.capture(params, cfg, cb, 1, 0)
    host = mem_lib.build(u, v_o, v_t, lam=pl.default_lam(u), alpha=1.0, q=2, layer=1, module=0)
    assert info["lam"] == pytest.approx(float(host.lam), rel=1e-6)
    for f in ("U", "Dm", "G", "W", "active", "lam"):
        np.testing.assert_allclose(np.asarray(getattr(mem, f)), np.asarray(getattr(host, f)), rtol=1e-6,
                                   atol=1e-7 * float(np.abs(np.asarray(getattr(host, f))).max()), err_msg=f)
    # past DEVICE_SOLVE_MAX facts the host solves
    monkeypatch.setattr(mem_lib, "DEVICE_SOLVE_MAX", 4)
    mem_h, info_h = pl.install(params, cfg, tok, facts, coord, alpha=1.0, q=2)
    assert info_h["solved_on"] == "host"
    np.testing.assert_array_equal(np.asarray(mem_h.G), np.asarray(host.G))
    # a fact without an object position is named after the device solve was queued, and nothing returned
    monkeypatch.undo()
    bad = dataclasses.replace(cb, obj_valid=cb.obj_valid.at[2].set(False))
    with pytest.raises(ValueError, match=r"facts \[2\] have no valid object positions"):
        pl.capture_and_build(params, cfg, bad, coord, 1.0, 2)
    with pytest.raises(ValueError, match="lambda must be > 0"):
        pl.install(params, cfg, tok, facts, coord, 1.0, 2, lam=0.0)
    with pytest.raises(ValueError, match="empty"):
        pl.install(params, cfg, tok, [], coord, 1.0, 2)
    with pytest.raises(ValueError, match="no subject span"):
        pl.trace_facts(params, cfg, [f for f in F.load_facts(tok, "forget01", tok.eos_id) if f.key_source != "subject"])
    # same memory at another (alpha, q) is data only
    m2 = pl.with_hparams(mem, 2.0, 4)
    assert float(m2.alpha) == 2.0 and int(m2.q) == 4 and m2.U is mem.U
