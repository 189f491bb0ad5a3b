"""sharding: the TIE sweep with its lanes, and the capture with its facts, spread over 4 virtual CPU
devices give the one-device results; an unpadded FactBatch runs its forwards without a mask and
still gives the masked results.

JAX fixes its device count when it starts, and other tests have started it already, so the
multi-device part runs in a fresh interpreter with XLA_FLAGS=--xla_force_host_platform_device_count=4
and reports its numbers as JSON; the assertions are made here.
"""
import os
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from conftest import EarlyProcess

from timerome_jax.method import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r"""
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from timerome_jax.method import capture as cap_lib
    from timerome_jax.method import sharding
    from timerome_jax.method import trace as tr
    from timerome_jax.backbone.config import ModelConfig
    from timerome_jax.backbone.model import init_params

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64,
                      mask_token_id=63, pad_token_id=0, eos_token_id=1, max_seq_len=64)
    tcfg = tr.TraceConfig(steps=3, n_noise=1, chunk=2, tau=0.7)
    params = init_params(jax.random.key(0), cfg, std=0.3)
    # unpadded facts (equal lengths): 9 lanes for L=2, K=3 -> padded to 12 on 4 devices
    fb = tr.make_fact_batch([[5, 6, 7, 8], [9, 10, 11, 12], [20, 21, 22, 23]], [[1, 2], [0], [3]],
                            [[12, 13, 14], [16, 17, 2], [30, 31, 32]], cfg)
    out = {"n_devices": jax.device_count()}
    one = tr.trace(params, cfg, fb, tcfg)
    runs = {"sharded_1": sharding.trace(params, cfg, fb, tcfg, devices=jax.devices()[:1]),
            "sharded_4": sharding.trace(params, cfg, fb, tcfg, mesh=sharding.make_mesh())}
    out["trace"] = {k: {f: float(np.nanmax(np.abs(getattr(r, f) - getattr(one, f)))) for f in tr.TraceResult._fields}
                    for k, r in runs.items()}
    out["trace_nan_pattern_equal"] = {k: bool(np.array_equal(np.isnan(r.tie), np.isnan(one.tie))) for k, r in runs.items()}
    out["tie_bar_scale"] = float(np.abs(one.tie_bar).max())

    # the lane axis really is split: the runner's scores live on 4 devices, 3 lanes each
    mesh = sharding.make_mesh()
    p4, f4 = sharding.replicate(params, mesh), sharding.replicate(dataclasses.replace(fb, pad_mask=None), mesh)
    clean = tr.trajectory(p4, f4, None, cfg=cfg, tcfg=tcfg, read=True)
    noise = sharding.replicate(jnp.zeros(fb.x0.shape + (cfg.d_model,)), mesh)
    corr = tr.trajectory(p4, f4, noise, cfg=cfg, tcfg=tcfg, read=False)
    lanes = tr.plan_lanes(cfg.n_layers, tcfg.steps)
    runner = sharding.LanesRunner(mesh, cfg, tcfg)
    padded = runner.fn(p4, f4, noise, corr, clean.acts, runner.prepare(lanes))
    out["lanes"] = len(lanes)
    out["padded_lanes"] = int(padded.shape[0])
    out["score_shards"] = sorted(int(s.data.shape[0]) for s in padded.addressable_shards)
    out["score_devices"] = len(padded.sharding.device_set)
    ref = tr.run_lanes(params, dataclasses.replace(fb, pad_mask=None), jnp.zeros(fb.x0.shape + (cfg.d_model,)),
                       tr.trajectory(params, dataclasses.replace(fb, pad_mask=None), jnp.zeros(fb.x0.shape + (cfg.d_model,)),
                                     cfg=cfg, tcfg=tcfg, read=False),
                       tr.trajectory(params, dataclasses.replace(fb, pad_mask=None), None, cfg=cfg, tcfg=tcfg,
                                     read=True).acts, jnp.asarray(lanes), cfg=cfg, tcfg=tcfg)
    out["runner_vs_run_lanes"] = float(np.abs(np.asarray(padded)[: len(lanes)] - np.asarray(ref)).max())

    # no mask vs the explicit all-True mask: the same trajectories
    masked = tr.trajectory(params, fb, None, cfg=cfg, tcfg=tcfg, read=True)
    nomask = tr.trajectory(params, dataclasses.replace(fb, pad_mask=None), None, cfg=cfg, tcfg=tcfg, read=True)
    out["mask_vs_none"] = {"scores": float(np.abs(masked.scores - nomask.scores).max()),
                           "acts": float(np.abs(masked.acts - nomask.acts).max()),
                           "xs_equal": bool(np.array_equal(masked.xs, nomask.xs))}

    # capture: 7 facts; one device, chunk 3 -> three calls (last padded); 4 devices, chunk 1 -> two calls of 4
    rng = np.random.default_rng(0)
    n = 7
    prompts = [list(rng.integers(2, 60, int(rng.integers(4, 7)))) for _ in range(n)]
    cb = cap_lib.make_cloze_batch(None, prompts, [[0, 1]] * n, [list(rng.integers(2, 60, 2)) for _ in range(n)],
                                 target_text=[list(rng.integers(2, 60, 3)) for _ in range(n)], cfg=cfg)
    base = cap_lib.capture(params, cfg, cb, 1, "resid", chunk=3)
    out["capture"] = {}
    for chunk, name, kw in ((3, "1", {"devices": jax.devices()[:1]}), (1, "4", {})):
        got = sharding.capture(params, cfg, cb, 1, "resid", chunk=chunk, **kw)
        out["capture"][f"chunk{chunk}_dev{name}"] = {
            "max_abs_diff": max(float(np.abs(np.asarray(g) - np.asarray(b)).max()) for g, b in zip(got, base)),
            "shapes_equal": all(g.shape == b.shape for g, b in zip(got, base))}
    out["capture_scale"] = float(np.abs(np.asarray(base[0])).max())
    print("RESULT " + json.dumps(out))
""")


# started right after collection (conftest.EarlyProcess): it runs beside the in-process tests;
# the suite's other XLA settings (JAX_DISABLE_MOST_OPTIMIZATIONS) come with os.environ
FOUR_DEVICES = EarlyProcess(__name__, "four_devices", lambda _: [sys.executable, "-c", SCRIPT], env={
    **os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})


@pytest.fixture(scope="module")
def four_devices():
    return FOUR_DEVICES.json_result()


@pytest.mark.slow
def test_sweep_on_4_devices_equals_one_device(four_devices):
    r = four_devices
    assert r["n_devices"] == 4
    assert r["tie_bar_scale"] > 1e-2  # a real comparison, not of zeros
    for run, diffs in r["trace"].items():
        for field, d in diffs.items():
            assert d <= 1e-5, f"{run}: {field} differs from the one-device sweep by {d}"
        assert r["trace_nan_pattern_equal"][run], run


@pytest.mark.slow
def test_lanes_are_split_over_the_devices(four_devices):
    r = four_devices
    assert r["lanes"] == 9 and r["padded_lanes"] == 12
    assert r["score_devices"] == 4 and r["score_shards"] == [3, 3, 3, 3]
    assert r["runner_vs_run_lanes"] <= 1e-5


@pytest.mark.slow
def test_unpadded_batch_runs_without_mask_and_matches(four_devices):
    m = four_devices["mask_vs_none"]
    assert m["xs_equal"] and m["scores"] <= 1e-5 and m["acts"] <= 1e-5


@pytest.mark.slow
def test_capture_on_4_devices_equals_memory_capture(four_devices):
    r = four_devices
    assert r["capture_scale"] > 1e-2
    assert set(r["capture"]) == {"chunk3_dev1", "chunk1_dev4"}
    for k, v in r["capture"].items():
        assert v["shapes_equal"], k
        # fp32 rounding only: chunks of other sizes are other matmul shapes (relative 1e-6 of the scale)
        assert v["max_abs_diff"] <= 2e-6 * r["capture_scale"], f"{k}: {v['max_abs_diff']}"


def test_mesh_arguments_are_checked():
    with pytest.raises(ValueError, match="no devices"):
        sharding.make_mesh([])
    # trace and capture check their mesh / devices arguments before touching the model
    with pytest.raises(ValueError, match="not both"):
        sharding.trace(None, None, None, mesh=sharding.make_mesh(), devices=jax.devices())
    with pytest.raises(ValueError, match="1-D mesh with axis"):
        sharding.trace(None, None, None, mesh=Mesh(np.asarray(jax.devices()[:1], dtype=object), ("x",)))
    with pytest.raises(ValueError, match="repeat"):
        sharding.make_mesh([jax.devices()[0]] * 2)
