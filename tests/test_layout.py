"""Params layout (stacked [L, ...] leaves vs a list of per-layer dicts): the model helpers, every
consumer of params gives the same numbers with either layout, `load_model(layout=...)` returns the
requested one (auto = unstacked on GPU only), and an edit forward has no conditional or loop."""
import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timerome_jax.backbone import checkpoint, hf_weights, model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.backbone.nnx import MDLM
from timerome_jax.baselines import lora
from timerome_jax.baselines import train as T
from timerome_jax.diffusion import likelihood
from timerome_jax.editors import locate, states, weights
from timerome_jax.method import capture
from timerome_jax.method import facts as F
from timerome_jax.method import memory as mem_lib
from timerome_jax.method import screen as sc
from timerome_jax.method import sharding
from timerome_jax.method import trace as tr

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                  mask_token_id=63, pad_token_id=0, eos_token_id=0, max_seq_len=64)
TC = tr.TraceConfig(steps=2, n_noise=1, chunk=4, tau=0.7)


@pytest.fixture(scope="module")
def both():
    params = model.init_params(jax.random.key(0), CFG, std=0.3)
    return params, model.unstack(params)


def test_layer_helpers_agree_across_layouts(both):
    st, up = both
    assert model.layout_of(st) == "stacked" and model.layout_of(up) == "unstacked"
    assert model.n_layers(st) == model.n_layers(up) == CFG.n_layers
    assert model.layer_shapes(st) == model.layer_shapes(up) == \
        {k: v[1:] for k, v in model.param_shapes(CFG)["layers"].items()}
    for l in range(CFG.n_layers):
        chex.assert_trees_all_equal(model.layer_params(st, l), model.layer_params(up, l))
        np.testing.assert_array_equal(model.layer_weight(st, "w_down", l), up["layers"][l]["w_down"])
    np.testing.assert_array_equal(model.stacked_weight(up, "wq"), st["layers"]["wq"])
    assert model.stacked_weight(st, "wq") is st["layers"]["wq"]
    v = jnp.full((CFG.d_ff, CFG.d_model), 0.5, jnp.float32)
    a, b = model.with_layer_weight(st, "w_down", 1, v), model.with_layer_weight(up, "w_down", 1, v)
    assert model.layout_of(a) == "stacked" and model.layout_of(b) == "unstacked"
    chex.assert_trees_all_equal(model.unstack(a), b)
    assert b["layers"][0] is up["layers"][0] and b["embed"] is up["embed"]  # untouched arrays shared
    assert up["layers"][1]["w_down"] is not v  # the input tree is not modified
    w = {"wo": 2.0 * st["layers"]["wo"]}
    chex.assert_trees_all_equal(model.unstack(model.with_stacked_weights(st, w)), model.with_stacked_weights(up, w))
    with pytest.raises(ValueError, match="out of range for a 2-layer model"):
        model.layer_params(up, 2)
    with pytest.raises(KeyError, match="not in the model"):
        model.layer_weight(st, "w_nope", 0)
    with pytest.raises(ValueError, match="has shape"):
        model.with_layer_weight(up, "w_down", 0, v.T)
    with pytest.raises(ValueError, match="must have shape"):
        model.with_stacked_weights(up, {"wo": st["layers"]["wo"][:1]})
    # consume=True gives the same tree and frees the stacked leaves
    own = jax.tree.map(jnp.copy, st)
    chex.assert_trees_all_equal(model.unstack(own, consume=True), up)
    assert own["layers"]["wq"].is_deleted()


def test_resolve_layout_auto_follows_the_backend(monkeypatch):
    assert model.LAYOUTS == ("stacked", "unstacked", "auto")
    assert model.resolve_layout("stacked") == "stacked" and model.resolve_layout("unstacked") == "unstacked"
    assert model.resolve_layout("auto") == ("unstacked" if jax.default_backend() == "gpu" else "stacked")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert model.resolve_layout("auto") == "unstacked"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert model.resolve_layout("auto") == "stacked"
    with pytest.raises(ValueError, match=r"layout must be one of \('stacked', 'unstacked', 'auto'\), got 'rolled'"):
        model.resolve_layout("rolled")


def test_load_model_returns_the_requested_layout(both, tmp_path, monkeypatch):
    st, up = both
    hf, orbax = str(tmp_path / "hf"), str(tmp_path / "orbax")
    hf_weights.save_pretrained(up, CFG, hf)  # unstacked params save like stacked ones
    checkpoint.save(up, CFG, orbax)
    for path in (hf, orbax):
        for layout, want in (("stacked", "stacked"), ("unstacked", "unstacked"), ("auto", "stacked")):
            params, cfg, _ = checkpoint.load_model(path, layout=layout)
            assert model.layout_of(params) == want, (path, layout)
            chex.assert_trees_all_equal(params, st if want == "stacked" else up)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert model.layout_of(checkpoint.load_model(orbax)[0]) == "unstacked"  # the default is auto
    with pytest.raises(ValueError, match="layout must be one of"):
        checkpoint.load_model(hf, layout="Stacked")
    with pytest.raises(ValueError, match="layout must be one of"):  # before the folder is looked at
        checkpoint.load_model_with_tokenizer(str(tmp_path / "absent"), layout="list")


@pytest.mark.slow  # compiles
def test_editors_same_with_unstacked(both):
    st, up = both
    x = jnp.asarray([[5, 6, 7, 8, 63, 63], [9, 10, 11, 63, 63, 0]], jnp.int32)
    pad = x != 0
    for layer in (0, 1):
        np.testing.assert_array_equal(states.mlp_keys(st, CFG, x, pad, layer), states.mlp_keys(up, CFG, x, pad, layer))
    delta = np.random.default_rng(0).normal(size=(CFG.d_ff, CFG.d_model))
    a, b = weights.add_to_w_down(st, 1, delta), weights.add_to_w_down(up, 1, delta)
    assert model.layout_of(b) == "unstacked"
    chex.assert_trees_all_equal(model.unstack(a), b)
    np.testing.assert_array_equal(weights.w_down(a, 1), weights.w_down(b, 1))
    assert set(weights.diff_params(up, b)) == {"['layers'][1]['w_down']"}
    facts = [F.Fact(0, None, "q", "a", "s", (5, 6, 7), (1, 2), "subject", (12, 13, 0)),
             F.Fact(1, None, "q", "a", "s", (9, 10), (0,), "subject", (14, 0))]
    np.testing.assert_allclose(locate.positional_trace(up, CFG, facts, n_noise=1),
                               locate.positional_trace(st, CFG, facts, n_noise=1), rtol=1e-5, atol=1e-6)


def test_lora_and_full_finetuning_combine_across_layouts(both):
    st, up = both
    ad_s = lora.init(jax.random.key(1), st, rank=2, targets=("wq", "w_up"))
    ad_u = lora.init(jax.random.key(1), up, rank=2, targets=("wq", "w_up"))
    chex.assert_trees_all_equal(ad_s, ad_u)
    ad_s["B"] = jax.tree.map(lambda b: b + 0.1, ad_s["B"])
    merged = lora.merge(up, ad_s)
    assert model.layout_of(merged) == "unstacked" and merged["layers"][0]["wo"] is up["layers"][0]["wo"]
    np.testing.assert_array_equal(model.layer_weight(merged, "wk", 1), model.layer_weight(up, "wk", 1))
    chex.assert_trees_all_close(model.stack(merged), lora.merge(st, ad_s), rtol=1e-6, atol=1e-6)
    tcfg = T.TrainConfig(mode="full", targets=("w_down", "wo"))
    tr_s, _ = T.split_trainable(st, jax.random.key(0), tcfg)
    tr_u, _ = T.split_trainable(up, jax.random.key(0), tcfg)
    chex.assert_trees_all_equal(tr_s, tr_u)
    tr_s = jax.tree.map(lambda a: a * 1.5, tr_s)
    chex.assert_trees_all_equal(model.unstack(T.combine(tr_s, st, tcfg)), T.combine(tr_s, up, tcfg))


@pytest.mark.slow  # compiles
def test_full_finetuning_train_gives_the_same_params(tiny_llada):
    params, cfg, tok = tiny_llada
    rows = [{"question": f"Who wrote book {i}?", "answer": f"Author {i} wrote it."} for i in range(4)]
    retain = [{"question": f"What is {i}?", "answer": f"It is {i}."} for i in range(4)]
    tcfg = T.TrainConfig(objective="ga", steps=2, lr=1e-2, batch_size=2, retain_batch_size=2, mode="full",
                         targets=("w_down",), train_layers=(1,), monitor_rows=2, monitor_every=2, max_drift=None)
    rs = T.train(params, cfg, tok, rows, retain, tcfg, seed=0, progress=False)
    ru = T.train(model.unstack(params), cfg, tok, rows, retain, tcfg, seed=0, progress=False)
    assert model.layout_of(ru.params) == "unstacked"
    chex.assert_trees_all_close(model.stack(ru.params), rs.params, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(ru.params["layers"][1]["w_down"], params["layers"]["w_down"][1])


@pytest.fixture(scope="module")
def fb():
    return tr.make_fact_batch([[5, 6, 7, 8], [9, 10, 11]], [[1, 2], [0]], [[12, 13, 0], [16, 0]], CFG)


@pytest.mark.slow  # three TIE sweeps
def test_trace_same_with_unstacked(both, fb):
    st, up = both
    with jax.default_matmul_precision("highest"):
        a, b = tr.trace(st, CFG, fb, TC), tr.trace(up, CFG, fb, TC)
        np.testing.assert_allclose(b.tie_bar, a.tie_bar, rtol=1e-4, atol=1e-5)
        c = sharding.trace(up, CFG, fb, TC, devices=jax.devices()[:1])
        np.testing.assert_allclose(c.tie_bar, a.tie_bar, rtol=1e-4, atol=1e-5)


def test_capture_same_with_unstacked_sharded_or_not(both):
    # the capture hands only layers 0..layer to its jitted call when params are unstacked
    st, up = both
    cb = capture.ClozeBatch(*(jnp.asarray(a) for a in (
        [[5, 6, 7, 8, 9, 0]], [[True] * 5 + [False]], [[1, 2]], [[True, True]], [[3, 4]], [[True, True]],
        [[5, 6, 7, 10, 11, 0]], [[True] * 5 + [False]], [[3, 4]], [[True, True]])))
    with jax.default_matmul_precision("highest"):
        want = capture.capture(st, CFG, cb, 0, "mlp")
        for got in (capture.capture(up, CFG, cb, 0, "mlp"),
                    sharding.capture(up, CFG, cb, 0, "mlp", devices=jax.devices()[:1])):
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two screens
def test_screen_same_with_unstacked(both, fb):
    st, up = both
    with jax.default_matmul_precision("highest"):
        sa, sb = sc.screen(st, CFG, fb, TC, alphas=(1.0,)), sc.screen(up, CFG, fb, TC, alphas=(1.0,))
        np.testing.assert_allclose(sb.estimate, sa.estimate, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiles
def test_elbo_and_nnx_same_with_unstacked(both):
    st, up = both
    toks, ans, pad = likelihood.make_qa_batch([[5, 6, 7], [8, 9]], [[10, 11, 0], [12, 0]], CFG)
    key = jax.random.key(3)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(likelihood.elbo(up, CFG, toks, ans, pad, key, n_mc=4),
                                   likelihood.elbo(st, CFG, toks, ans, pad, key, n_mc=4), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(MDLM(up, CFG)(toks, pad), MDLM(st, CFG)(toks, pad), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(MDLM(up, CFG).params_tree(), up)


def _primitives(jaxpr) -> set:
    """Names of every primitive in a jaxpr and in the (closed) jaxprs its equations carry."""
    out = set()
    for eq in jaxpr.eqns:
        out.add(eq.primitive.name)
        for v in eq.params.values():
            for j in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(j, "eqns"):
                    out |= _primitives(j)
                elif hasattr(getattr(j, "jaxpr", None), "eqns"):
                    out |= _primitives(j.jaxpr)
    return out


def _gpu_module(fn, *args) -> str:
    """The StableHLO a GPU would compile for fn(*args), lowered here without a GPU (jax.export),
    without the platform selections of `lax.platform_dependent`: `stablehlo.case` ops whose index
    is a constant (or another such case), which XLA folds away before it compiles anything."""
    text = jax.export.export(jax.jit(fn), platforms=("cuda",))(*args).mlir_module()
    static = set(re.findall(r"(%[\w#]+) = stablehlo\.constant", text))
    kept = []
    for line in text.splitlines():
        m = re.search(r'(%[\w#]+) = "stablehlo\.case"\((%[\w#]+)\)', line)
        if m and m.group(2) in static:
            static.add(m.group(1))
            continue
        kept.append(line)
    return "\n".join(kept)


def test_edit_forward_has_no_conditional_or_loop(both):
    """A memory of capacity > TOPQ_FAST with q as data: lowered for the GPU, the unstacked edit
    forward is straight-line code (no conditional, loop or host callback; a GPU conditional copies
    its predicate to the host in every forward) and the stacked one has only its layer loops. On
    the CPU, top_q keeps its cheap conditional (a row sort costs more there)."""
    st, up = both
    rng = np.random.default_rng(0)
    u, vo, vt = (rng.standard_normal((3, CFG.d_model)).astype(np.float32) for _ in range(3))
    mem = mem_lib.build(u, vo, vt, lam=1.0, alpha=0.5, q=2, layer=1, module="mlp", step=-1,
                        capacity=mem_lib.TOPQ_FAST + 8)
    white = mem_lib.fit_whitening(rng.standard_normal((100, CFG.d_model)))
    gated = mem_lib.build(u, vo, vt, lam=1.0, alpha=0.5, q=2, layer=1, module="mlp", step=-1,
                          capacity=mem_lib.TOPQ_FAST + 8, gate_keys=u, whitening=white, tau=0.3)
    x = jnp.asarray([[5, 6, 63, 63]], jnp.int32)
    fwd = lambda p, m: model.forward(p, x, CFG, None, Intervene(edit=m), 0)
    branches = ("stablehlo.case", "stablehlo.if", "custom_call @xla_python", "host_callback")
    for m in (mem, gated):
        gpu_u, gpu_s = _gpu_module(fwd, up, m), _gpu_module(fwd, st, m)
        assert "stablehlo.sort" in gpu_u
        assert not [b for b in branches + ("stablehlo.while",) if b in gpu_u]
        assert not [b for b in branches if b in gpu_s]
        cpu_u = jax.jit(fwd).lower(up, m).as_text()
        assert "stablehlo.case" in cpu_u or "stablehlo.if" in cpu_u  # the CPU variant is the one lowered here
    # q stays data: other q values reuse the compiled forward
    f = jax.jit(fwd)
    for q in (0, 1, 5, mem_lib.TOPQ_FAST + 3):
        f(up, dataclasses.replace(mem, q=jnp.int32(q)))
    assert f._cache_size() == 1
