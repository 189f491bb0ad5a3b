"""TIE tracing: the lane-paired sweep equals a plain per-candidate loop, compiles once, and the
bookkeeping (Eq. 3 definition, Eq. 4 weights, Eq. 5 selection) does what the docstring says."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timerome_jax.diffusion import sampler
from timerome_jax.method import trace as tr
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch
from timerome_jax.backbone.model import init_params

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64,
                  mask_token_id=63, pad_token_id=0, eos_token_id=0, max_seq_len=64)
TC = tr.TraceConfig(steps=3, n_noise=2, chunk=5, tau=0.7)


@pytest.fixture(scope="module")
def setup():
    params = init_params(jax.random.key(0), CFG, std=0.3)
    fb = tr.make_fact_batch([[5, 6, 7, 8], [9, 10, 11]], [[1, 2], [0]], [[12, 13, 14, 15, 0], [16, 17, 0]], CFG)
    with jax.default_matmul_precision("highest"):
        res = tr.trace(params, CFG, fb, TC)
    return params, fb, res


@functools.partial(jax.jit, static_argnames=("read",))
def _one_step(params, fb, sched, x, lpf, step, iv, read=False):
    return tr._step(params, CFG, TC.sampler, fb, sched, x, lpf, step, iv, read)


def naive_scores(params, fb, noise, patch):
    """Plain loop: all K steps from the masked canvas, patch applied where it targets."""
    sched = sampler.schedule(fb.x0, fb.pad_mask, CFG, TC.sampler)
    x, lpf, out = fb.x0, jnp.zeros(fb.x0.shape), []
    for k in range(TC.steps):
        x, lpf, s, _ = _one_step(params, fb, sched, x, lpf, jnp.int32(k), Intervene(noise=noise, patch=patch))
        out.append(np.asarray(s))
    return np.stack(out)  # [K, B]


def test_lanes_equal_naive_loop(setup):
    params, fb, res = setup
    sigma = TC.noise_scale * float(jnp.std(params["embed"]))
    with jax.default_matmul_precision("highest"):
        clean = tr.trajectory(params, fb, None, cfg=CFG, tcfg=TC, read=True)
        tie = np.zeros_like(res.tie)
        for r in range(TC.n_noise):
            noise = tr.embedding_noise(jax.random.fold_in(jax.random.key(TC.seed), r), fb, params, sigma)
            corr = naive_scores(params, fb, noise, None)
            for m in range(3):
                for l in range(CFG.n_layers):
                    for k in range(TC.steps):
                        p = Patch(jnp.int32(l), jnp.int32(k), jnp.int32(m), fb.subj_pos, fb.subj_valid,
                                  clean.acts[k, m, l])
                        s = naive_scores(params, fb, noise, p)
                        tie[:, m, l, k, :] += (s - corr).T / TC.n_noise
    later = ~np.isnan(res.tie)
    np.testing.assert_allclose(res.tie[later], tie[later], rtol=1e-4, atol=1e-4)
    # steps k' <= k are NaN (undefined), every k has at least one later step
    assert np.isnan(res.tie[..., 2, 0]).all() and not np.isnan(res.tie[..., 2, 2]).any()


def test_patch_only_changes_later_steps_and_last_layer_resid_is_inert(setup):
    params, fb, res = setup
    # the last layer's block output on the subject feeds no later layer: no effect on the object
    np.testing.assert_allclose(res.tie[:, 0, CFG.n_layers - 1][~np.isnan(res.tie[:, 0, -1])], 0.0, atol=1e-5)
    assert res.clean.shape == (2, TC.steps) and res.corrupted.shape == (TC.n_noise, 2, TC.steps)


def test_sweep_compiles_once_for_new_values(setup):
    params, fb, _ = setup
    clean = tr.trajectory(params, fb, None, cfg=CFG, tcfg=TC, read=True)
    corr = tr.trajectory(params, fb, None, cfg=CFG, tcfg=TC, read=False)
    lanes = jnp.asarray(tr.plan_lanes(CFG.n_layers, TC.steps))
    counted = chex.assert_max_traces(tr._run_lanes, n=1)
    f = jax.jit(counted, static_argnames=("cfg", "tcfg"))
    for seed in range(3):  # new noise, new activations, new lanes order: same program
        noise = tr.embedding_noise(jax.random.key(seed), fb, params, 1.0 + seed)
        f(params, fb, noise, corr, clean.acts * (1 + seed), jnp.roll(lanes, seed, 0), cfg=CFG, tcfg=TC)
    chex.clear_trace_counter()


def test_plan_lanes_covers_each_candidate_once_with_minimal_work():
    for L, K in [(2, 3), (3, 4), (1, 1), (5, 8)]:
        lanes = tr.plan_lanes(L, K)
        seen = []
        for kA, lA, mA, kB, lB, mB in lanes:
            assert (K - kA) + (K - kB) == K + 1
            seen += [(kA, lA, mA)] + ([(kB, lB, mB)] if lB >= 0 else [])
        assert sorted(seen) == sorted((k, l, m) for k in range(K) for l in range(L) for m in range(3))


def test_decay_weights_and_select():
    w = tr.decay_weights(4, 0.5)
    np.testing.assert_allclose(w.sum(1), 1.0)
    # row k=1 weighs k' = 2..4, stored at columns k'-1 = 1..3
    assert w[1, 0] == 0 and w[1, 1] > w[1, 2] > w[1, 3] > 0 and w[3].sum() == 1 and w[3, 3] == 1
    np.testing.assert_allclose(w[1, 1] / w[1, 2], np.exp(0.5))
    tb = np.zeros((2, 3, 4, 5))
    tb[:, 0, 2, 1] = [3.0, -5.0]  # resid, layer 2, step 1: mean |.| = 4
    tb[:, 2, 3, 0] = 10.0         # mlp is stronger, but not allowed by default
    coord, score = tr.select(tb)
    assert coord == tr.Coordinate(layer=2, step=-1, module=0) and score[0, 2, 1] == 4.0
    assert tr.select(tb, modules=("resid", "mlp"), k_star=None)[0] == tr.Coordinate(3, 0, 2)
    nb = np.zeros_like(tb)
    nb[:, 0, 2, 1] = 4.0
    assert tr.select(tb, neighbours=nb, beta=1.0)[0].layer != 2


def test_bad_facts_raise():
    with pytest.raises(ValueError, match="empty subject"):
        tr.make_fact_batch([[1, 2]], [[]], [[3]], CFG)
    with pytest.raises(ValueError, match="outside the prompt"):
        tr.make_fact_batch([[1, 2]], [[5]], [[3]], CFG)
    with pytest.raises(ValueError, match="no facts"):
        tr.make_fact_batch([], [], [], CFG)


def test_heatmap_png(setup, tmp_path):
    _, _, res = setup
    out = tmp_path / "h.png"
    tr.plot_heatmaps(res.tie_bar.mean(0), str(out), "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
