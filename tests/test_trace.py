"""TIE tracing: the lane-paired sweep equals a plain per-candidate loop, compiles once, and the
bookkeeping (Eq. 3 definition, Eq. 4 weights, Eq. 5 selection) does what the docstring says.

Two kinds of reference: `naive_scores` reuses the library's own `trace.traced_step` (forward, object
bookkeeping, commit), so it checks the lane pairing, restarts and TIE accumulation, not what a step
computes. What TIE means is checked independently by `test_tie_by_hand_numpy` (a NumPy forward, noise
built from the subject positions by hand) and by the PyTorch parity test in test_torch_ref_trace.py;
where the noise goes is checked by `test_embedding_noise_only_on_subject_tokens`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timerome_jax.diffusion import sampler
from timerome_jax.method import trace as tr
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch
from timerome_jax.backbone import model
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


@jax.jit
def _one_step(params, fb, sched, x, lpf, step, iv):
    return tr.traced_step(params, CFG, TC.sampler, fb, sched, x, lpf, step, iv)


def naive_scores(params, fb, noise, patch):
    """Plain loop: all K steps from the masked canvas, patch applied where it targets. It calls the
    library's `trace.traced_step` once per step, so it shares that step's forward/bookkeeping/commit with
    the sweep: what it checks is the lanes' scheduling and the TIE accumulation around it."""
    sched = sampler.schedule(fb.x0, fb.pad_mask, CFG, TC.sampler)
    x, lpf, out = fb.x0, jnp.zeros(fb.x0.shape), []
    for k in range(TC.steps):
        x, lpf, s = _one_step(params, fb, sched, x, lpf, jnp.int32(k), Intervene(noise=noise, patch=patch))
        out.append(np.asarray(s))
    return np.stack(out)  # [K, B]


@pytest.mark.slow
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


@pytest.mark.slow
def test_patch_only_changes_later_steps_and_last_layer_resid_is_inert(setup):
    params, fb, res = setup
    sigma = TC.noise_scale * float(jnp.std(params["embed"]))
    noise = tr.embedding_noise(jax.random.key(3), fb, params, sigma)
    k, l, m = 1, 0, 0
    clean = tr.trajectory(params, fb, None, cfg=CFG, tcfg=TC, read=True)
    patch = Patch(jnp.int32(l), jnp.int32(k), jnp.int32(m), fb.subj_pos, fb.subj_valid, 5.0 + clean.acts[k, m, l])
    fwd = jax.jit(model.forward, static_argnums=2)
    with jax.default_matmul_precision("highest"):
        # the forward of every other step ignores the patch; the forward of step k does not
        for step in range(TC.steps):
            plain = fwd(params, fb.x0, CFG, fb.pad_mask, Intervene(noise=noise), jnp.int32(step))
            got = fwd(params, fb.x0, CFG, fb.pad_mask, Intervene(noise=noise, patch=patch), jnp.int32(step))
            if step == k:
                assert np.abs(np.asarray(got - plain)).max() > 1e-2
            else:
                np.testing.assert_array_equal(got, plain)
        # along a trajectory: s(1..k) are the corrupted run's, s(k+1) (from step k's forward) moves
        corr = naive_scores(params, fb, noise, None)
        patched = naive_scores(params, fb, noise, patch)
    np.testing.assert_array_equal(patched[:k], corr[:k])
    assert np.abs(patched[k] - corr[k]).max() > 1e-3
    # the last layer's block output on the subject feeds no later layer: no effect on the object
    np.testing.assert_allclose(res.tie[:, 0, CFG.n_layers - 1][~np.isnan(res.tie[:, 0, -1])], 0.0, atol=1e-5)
    assert res.clean.shape == (2, TC.steps) and res.corrupted.shape == (TC.n_noise, 2, TC.steps)


def test_embedding_noise_only_on_subject_tokens():
    """Eq. 2 corrupts the subject tokens only: the noise is sigma * N(0, I) at the subject positions
    (here built by hand from the prompts' subject indices and the left padding), zero elsewhere,
    including prompt, object and padding positions and the padded slots of subj_pos."""
    prompts, subj = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[1, 2], [0]]
    fb = tr.make_fact_batch(prompts, subj, [[14, 15], [16, 17, 18]], CFG)
    params = {"embed": jnp.ones((CFG.vocab_size, 16))}
    key = jax.random.key(11)
    noise = np.asarray(tr.embedding_noise(key, fb, params, 2.0))
    T = fb.x0.shape[1]
    on = np.zeros((2, T), bool)
    on[0, [1, 2]] = True          # fact 0: no left padding (longest prompt)
    on[1, [3 + 0]] = True         # fact 1: 3 tokens of left padding
    assert noise.shape == (2, T, 16)
    np.testing.assert_array_equal(noise[~on], 0.0)
    want = 2.0 * np.asarray(jax.random.normal(key, (2, T, 16), jnp.float32))
    np.testing.assert_allclose(noise[on], want[on], rtol=1e-6)
    assert np.all(noise[on] != 0)


def _np_rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _np_forward(p, tokens, pad, noise, cfg, patch=None):
    """LLaDA forward in float64 NumPy, written from the paper/HF definitions (RMSNorm, half-split
    RoPE, bidirectional attention over non-pad keys, SwiGLU). patch = (layer, module, rows, cols,
    values) overwrites that module's output there. Returns logits and {(layer, module): output}."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else
             {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in p.items()}
    B, T = tokens.shape
    H, hd = cfg.n_heads, cfg.head_dim
    h = p["embed"][tokens] + noise
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [B,T,H,hd]
        rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos[None, :, None] + rot * sin[None, :, None]

    acts = {}

    def patched(v, l, m):
        if patch is not None and patch[0] == l and patch[1] == m:
            v = v.copy()
            v[patch[2], patch[3]] = patch[4]
        acts[(l, m)] = v
        return v

    for l in range(cfg.n_layers):
        lp = {k: v[l] for k, v in p["layers"].items()}
        n = _np_rms(h, lp["attn_norm"], cfg.norm_eps)
        q = rope((n @ lp["wq"]).reshape(B, T, H, hd))
        k = rope((n @ lp["wk"]).reshape(B, T, H, hd))
        v = (n @ lp["wv"]).reshape(B, T, H, hd)
        sc = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
        sc = np.where(pad[:, None, None, :], sc, -np.inf)
        a = np.exp(sc - sc.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        att = np.einsum("bhts,bshd->bthd", a, v).reshape(B, T, H * hd) @ lp["wo"]
        h = h + patched(att, l, 1)
        mn = _np_rms(h, lp["mlp_norm"], cfg.norm_eps)
        g = mn @ lp["w_gate"]
        mlp = (g / (1 + np.exp(-g)) * (mn @ lp["w_up"])) @ lp["w_down"]
        h = h + patched(mlp, l, 2)
        h = patched(h, l, 0)
    logits = _np_rms(h, p["final_norm"], cfg.norm_eps) @ p["lm_head"]
    return logits, acts


@pytest.mark.slow
def test_tie_by_hand_numpy():
    """TIE with K = 1 step, computed by hand: s = sum over object positions of log p(o_i) from the one
    forward on the all-masked object, TIE(l, 0, m, 1) = mean over noise draws r of s(corrupted_r with
    the clean module output spliced in on the subject) - s(corrupted_r). Forward in NumPy, noise
    placed on the subject by hand; the library's trace must agree."""
    tc = tr.TraceConfig(steps=1, n_noise=2, chunk=4, seed=7, noise_scale=3.0)
    params = init_params(jax.random.key(5), CFG, std=0.3)
    prompts, subj, objs = [[5, 6, 7, 8], [9, 10, 11]], [[1, 2], [0]], [[12, 13, 14], [16, 17]]
    fb = tr.make_fact_batch(prompts, subj, objs, CFG)
    with jax.default_matmul_precision("highest"):
        res = tr.trace(params, CFG, fb, tc)
    tokens, pad = np.asarray(fb.x0), np.asarray(fb.pad_mask)
    B, T = tokens.shape
    P = 4  # longest prompt: prompts are left-padded to it, objects start there
    rows = np.asarray([0, 0, 1])
    cols = np.asarray([1, 2, 0 + 1])  # fact 1 is left-padded by one token
    obj_pos = [(0, P + i, o) for i, o in enumerate(objs[0])] + [(1, P + i, o) for i, o in enumerate(objs[1])]

    def score(logits):
        z = logits - logits.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        s = np.zeros(B)
        for b, t, o in obj_pos:
            s[b] += lp[b, t, o]
        return s

    sigma = tc.noise_scale * float(np.std(np.asarray(params["embed"], np.float64)))
    zero = np.zeros((B, T, CFG.d_model))
    _, clean_acts = _np_forward(params, tokens, pad, zero, CFG)
    tie = np.zeros((B, 3, CFG.n_layers))
    for r in range(tc.n_noise):
        g = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(tc.seed), r), (B, T, CFG.d_model)),
                       np.float64)
        noise = zero.copy()
        noise[rows, cols] = sigma * g[rows, cols]
        s_corr = score(_np_forward(params, tokens, pad, noise, CFG)[0])
        for l in range(CFG.n_layers):
            for m in range(3):
                val = clean_acts[(l, m)][rows, cols]
                s_p = score(_np_forward(params, tokens, pad, noise, CFG, (l, m, rows, cols, val))[0])
                tie[:, m, l] += (s_p - s_corr) / tc.n_noise
    np.testing.assert_allclose(res.tie[..., 0, 0], tie, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(res.tie_bar[..., 0], tie, rtol=2e-3, atol=2e-4)  # K = 1: one later step, w = 1
    assert np.abs(tie[:, :, 0]).max() > 0.05  # layer 0 matters: not a comparison of zeros
    np.testing.assert_allclose(tie[:, :, 1], 0.0, atol=1e-9)  # the last layer's subject outputs reach no object


@pytest.mark.slow
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


def test_heatmap_png(tmp_path):
    out = tmp_path / "h.png"
    tr.plot_heatmaps(np.random.default_rng(0).normal(size=(3, CFG.n_layers, TC.steps)), str(out), "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
