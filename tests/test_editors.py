"""Weight editors (ROME, MEMIT, AlphaEdit) and the GRACE codebook on the tiny LLaDA."""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import timerome_jax.editors  # noqa: F401  (registers the methods)
from timerome_jax import methods
from timerome_jax.backbone import model as M
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.editors import grace as G
from timerome_jax.editors import states as S
from timerome_jax.editors.alphaedit import alphaedit_solve, null_space_projector
from timerome_jax.editors.memit import memit_solve
from timerome_jax.editors.rome import rome_update
from timerome_jax.editors.weights import diff_params, load_params, numerical_rank, save_params, task_batch

ROWS = [
    {"question": "Where was Jaime Vasquez born?", "answer": "In Santiago, Chile.", "subject": "Jaime Vasquez"},
    {"question": "What genre does Basil Mahfouz Al-Kuwaiti write?", "answer": "French literature.",
     "subject": "Basil Mahfouz Al-Kuwaiti"},
]
RETAIN = [{"question": "What did the author's father do?", "answer": "He was a chef."},
          {"question": "Who wrote the novel?", "answer": "An award-winning author."}]
FAST = dict(steps=2, n_draws=2, key_draws=2)


def _copy(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def task(tiny_llada):
    params, cfg, tok = tiny_llada
    return methods.EditTask(params, cfg, tok, "forget01", ROWS, RETAIN, seed=0)


# layer 0: in a 2-layer model, a value written at the subject token of the last layer reaches no
# answer token (no attention after it), so its delta has a zero gradient
@pytest.mark.slow
@pytest.mark.parametrize("name, hp", [("rome", dict(layer=0)), ("memit", dict(layers=(0,))),
                                      ("alphaedit", dict(layers=(0,), null_threshold=0.5))])
def test_weight_editors_copy_save_load_diff(task, tmp_path, name, hp):
    before = _copy(task.params)
    prep = methods.prepare(name, task, cache_dir=None, **FAST, **hp)
    assert _same(before, task.params), "the original params changed"
    d = diff_params(task.params, prep.params)
    assert list(d) == ["['layers']['w_down']"], d
    assert set(d["['layers']['w_down']"]["layers"]) == {0}
    save_params(prep.params, tmp_path / "edited.npz")
    back = load_params(tmp_path / "edited.npz", task.params)
    assert _same(back, prep.params) and diff_params(prep.params, back) == {}
    assert prep.info["prepare_s"] > 0


def test_rome_rank1_maps_key_to_value():
    rng = np.random.default_rng(0)
    F, D = 24, 8
    W, k, v = rng.normal(size=(F, D)), rng.normal(size=F), rng.normal(size=D)
    A = rng.normal(size=(F, 3 * F))
    C = A @ A.T / (3 * F)
    delta = rome_update(W, C, k, v)
    assert numerical_rank(delta) == 1
    np.testing.assert_allclose(k @ (W + delta), v, rtol=1e-9, atol=1e-9)
    # the C-norm-minimal choice: any other rank-1 map of k to v costs more in tr(Delta C Delta^T)
    other = np.outer(k / (k @ k), v - k @ W)
    cost = lambda X: np.trace(X.T @ C @ X)
    assert cost(delta) < cost(other)


@pytest.mark.slow  # compiles the ROME key/value optimisation
def test_rome_method_single_fact_rank1_original_untouched(task, tmp_path):
    one = methods.EditTask(task.params, task.cfg, task.tokenizer, "forget01", ROWS[:1], RETAIN)
    before = _copy(one.params)
    prep = methods.prepare("rome", one, layer=0, cache_dir=None, **FAST)
    assert _same(before, one.params), "the original params changed"
    d = diff_params(one.params, prep.params)
    assert list(d) == ["['layers']['w_down']"] and d["['layers']['w_down']"]["layers"] == {0: 1}
    assert prep.info["delta_norm"] > 0 and prep.info["value_residual"] < 1e-6 * prep.info["delta_norm"]
    save_params(prep.params, tmp_path / "edited.npz")
    assert _same(load_params(tmp_path / "edited.npz", one.params), prep.params)


def test_memit_least_squares_matches_numpy():
    rng = np.random.default_rng(1)
    N, F, D, lam = 5, 16, 6, 3.0
    K, R = rng.normal(size=(N, F)), rng.normal(size=(N, D))
    A = rng.normal(size=(F, 2 * F))
    C = A @ A.T / (2 * F)
    got = memit_solve(K, R, C, lam)
    # min ||K X - R||^2 + lam tr(X^T C X) is least squares on the stacked system [K; sqrt(lam) C^1/2] X = [R; 0]
    w, U = np.linalg.eigh(C)
    half = U @ np.diag(np.sqrt(w)) @ U.T
    ref = np.linalg.lstsq(np.vstack([K, np.sqrt(lam) * half]), np.vstack([R, np.zeros((F, D))]), rcond=None)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)


def test_alphaedit_preserved_keys_unchanged():
    rng = np.random.default_rng(2)
    F, D, n0 = 20, 7, 6
    K0 = rng.normal(size=(n0, F))  # preserved keys span 6 of 20 dimensions
    P = null_space_projector(K0.T @ K0 / n0, 1e-8)
    assert round(np.trace(P)) == F - n0
    np.testing.assert_allclose(P @ P, P, atol=1e-10)
    W = rng.normal(size=(F, D))
    K, R = rng.normal(size=(4, F)), rng.normal(size=(4, D))
    delta = alphaedit_solve(K, R, P, lam=0.1)
    out0, out1 = K0 @ W, K0 @ (W + delta)
    assert np.abs(out1 - out0).max() < 1e-5
    assert np.abs(K @ delta).max() > 1e-2  # and the edit does something on the edited keys


def test_grace_add_expand_split_rules():
    e = 1.0
    b = G.insert(None, np.zeros(3), "a", e)
    assert len(b.keys) == 1 and b.eps.tolist() == [1.0]
    # same label within eps_init + eps: the radius expands to cover the query
    b = G.insert(b, np.array([1.5, 0, 0]), "a", e)
    assert len(b.keys) == 1 and b.eps[0] == pytest.approx(1.5) and b.assign == [0, 0]
    # same label inside the radius: nothing changes
    b = G.insert(b, np.array([0, 1.0, 0]), "a", e)
    assert len(b.keys) == 1 and b.eps[0] == pytest.approx(1.5)
    # far from every key: a new entry with eps_init
    b = G.insert(b, np.array([10.0, 0, 0]), "b", e)
    assert len(b.keys) == 2 and b.eps[1] == pytest.approx(1.0)
    # a different label within reach: a new entry, both radii halved to the distance
    b = G.insert(b, np.array([10.0, 1.2, 0]), "c", e)
    assert len(b.keys) == 3 and b.eps[1] == pytest.approx(0.6 - 1e-5) and b.eps[2] == pytest.approx(0.6)
    assert b.assign == [0, 0, 0, 1, 2]


def test_grace_codebook_replaces_only_inside_radius():
    book = G.HostCodebook(np.array([[0.0, 0.0], [5.0, 0.0]]), np.array([1.0, 1.0]), ["a", "b"], [0, 1])
    vals = np.array([[100.0, 100.0], [-100.0, -100.0]])
    h = jnp.asarray([[[0.5, 0.0], [3.0, 0.0], [5.0, 0.9], [9.0, 9.0]]], jnp.float32)
    last = G.to_edit(book, vals, 0, "resid", "last")
    out = np.asarray(h + last.delta(h))
    np.testing.assert_allclose(out[0], [[100, 100], [3, 0], [-100, -100], [9, 9]])
    after = G.to_edit(book, vals, 0, "resid", "after", capacity=4)
    out = np.asarray(h + after.delta(h))  # from the first matched token (0) on, its entry's value
    np.testing.assert_allclose(out[0], [[100, 100]] * 4)
    miss = jnp.asarray([[[3.0, 3.0], [2.0, -2.0]]], jnp.float32)
    assert not np.asarray(after.delta(miss)).any()


@pytest.mark.slow
def test_grace_method_is_an_intervention(task):
    before = _copy(task.params)
    prep = methods.prepare("grace", task, layer=1, steps=2, n_draws=2)
    assert prep.params is None and _same(before, task.params)
    book = prep.intervene.edit
    assert prep.info["n_entries"] == len(ROWS) and book.layer == 1
    _, b = task_batch(task)
    x = jnp.where(b.answer, task.cfg.mask_token_id, b.tokens)
    idx, hit = book.match(M.run(task.params, x, task.cfg, b.pad, Intervene(read_pos=jnp.arange(x.shape[1])[None]
                                                                           .repeat(x.shape[0], 0)),
                                stop_layer=1).acts["resid"][1])
    assert np.asarray(hit)[np.arange(len(ROWS)), np.asarray(b.query_pos)].all()
    edited = M.forward(task.params, x, task.cfg, b.pad, prep.intervene)
    assert not np.allclose(np.asarray(edited), np.asarray(M.forward(task.params, x, task.cfg, b.pad)))


def test_answer_states_mask_only_answer_tokens(task):
    _, b = task_batch(task)
    x, masked = S.answer_states(jax.random.PRNGKey(0), b, 5, task.cfg.mask_token_id)
    ans = np.tile(np.asarray(b.answer), (5, 1))
    m = np.asarray(masked)
    assert (m <= ans).all() and m.any(-1).all()
    assert (m[: b.n] == ans[: b.n]).all()  # draw 0: the all-masked start state
    np.testing.assert_array_equal(np.asarray(x)[~m], np.tile(np.asarray(b.tokens), (5, 1))[~m])


def test_codebook_values_are_data_no_retrace(tiny_llada):
    params, cfg, _ = tiny_llada
    traces = []

    @jax.jit
    def fwd(p, x, iv):
        traces.append(1)
        return M.forward(p, x, cfg, None, iv)

    x = jnp.full((1, 8), 5, jnp.int32)
    D = cfg.d_model
    for seed in range(3):  # different keys, values, radii and entry counts; same capacity
        rng = np.random.default_rng(seed)
        n = seed + 1
        book = G.HostCodebook(rng.normal(size=(n, D)), np.full(n, 1.0 + seed), ["a"] * n, list(range(n)))
        fwd(params, x, Intervene(edit=G.to_edit(book, rng.normal(size=(n, D)), 1, "resid", capacity=4)))
    assert len(traces) == 1
