"""The optax unlearning loop: one compile, determinism, untouched base, LoRA files, early stop."""
import jax
import numpy as np
import pytest

from timerome_jax.baselines import lora
from timerome_jax.baselines import train as T

ROWS = [{"question": f"Who wrote the novel number {i}?", "answer": f"The novel was written by author {i}."}
        for i in range(12)]
RETAIN = [{"question": f"What is fact {i}?", "answer": f"The quick brown fox {i} jumps."} for i in range(12)]


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def run(tiny_llada):
    params, cfg, tok = tiny_llada
    before = jax.tree.map(np.array, params)
    tcfg = T.TrainConfig(objective="npo", steps=4, lr=1e-2, batch_size=4, retain_batch_size=4, monitor_rows=4,
                         monitor_every=2, lora_rank=2, max_drift=None)
    T.TRACES.clear()
    r1 = T.train(params, cfg, tok, ROWS[:6], RETAIN, tcfg, seed=3, progress=False)
    traces = T.TRACES["step"]
    r2 = T.train(params, cfg, tok, ROWS[:6], RETAIN, tcfg, seed=3, progress=False)
    return params, cfg, tok, before, tcfg, r1, r2, traces


@pytest.mark.slow
def test_compiled_once_deterministic_base_untouched(run):
    params, cfg, tok, before, tcfg, r1, r2, traces = run
    assert traces == 1 and T.TRACES["step"] == 1  # 8 steps over two runs, one trace
    assert r1.info["steps_run"] == 4
    assert _leaves_equal(r1.adapter, r2.adapter)
    assert _leaves_equal(params, before)  # the base weights are not modified
    # the adapter moved, and merging it changes exactly the target matrices
    assert not np.allclose(np.asarray(r1.adapter["B"]["wq"]), 0)
    for k in params["layers"]:
        same = np.array_equal(np.asarray(r1.params["layers"][k]), np.asarray(params["layers"][k]))
        assert same == (k not in tcfg.targets), k
    assert np.array_equal(np.asarray(r1.params["embed"]), np.asarray(params["embed"]))


@pytest.mark.slow
def test_lora_save_load_roundtrip_and_corruption(run, tmp_path):
    *_, r1, _, _ = run
    path = tmp_path / "adapter.npz"
    lora.save(r1.adapter, path, {"split": "toy"})
    ad, header = lora.load(path)
    assert header["split"] == "toy" and header["rank"] == 2
    assert _leaves_equal(ad, r1.adapter)
    raw = path.read_bytes()
    (tmp_path / "bad.npz").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(lora.AdapterFileError):
        lora.load(tmp_path / "bad.npz")
    with np.load(path) as z:  # an array changed behind the header's checksum
        arrays = {k: z[k] for k in z.files}
    arrays["B.wq"] = arrays["B.wq"] + 1.0
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(lora.AdapterFileError, match="checksum"):
        lora.load(tmp_path / "tampered.npz")
    with pytest.raises(FileNotFoundError):
        lora.load(tmp_path / "missing.npz")


@pytest.mark.slow
def test_early_stop_rolls_back_and_full_mode_layer_mask(tiny_llada):
    params, cfg, tok = tiny_llada
    # unanchored gradient ascent at a large lr: RetainLP falls; a tight drift bound stops it
    tcfg = T.TrainConfig(objective="ga", steps=6, lr=5e-2, batch_size=4, retain_batch_size=4, retain_weight=0.0,
                         mode="full", targets=("w_down",), train_layers=(1,), monitor_rows=4, monitor_every=1,
                         max_drift=0.5)
    r = T.train(params, cfg, tok, ROWS[:6], RETAIN, tcfg, seed=0, progress=False)
    checks = [e for e in r.log if "check" in e]
    assert r.info["stopped_early"] and checks[-1]["drift"] >= 0.5
    assert r.info["steps_kept"] < r.info["steps_run"]
    wd, wd0 = np.asarray(r.params["layers"]["w_down"]), np.asarray(params["layers"]["w_down"])
    assert np.array_equal(wd[0], wd0[0])  # layer 0 is frozen by train_layers
    assert r.info["steps_kept"] == 0 or not np.array_equal(wd[1], wd0[1])


def test_lora_merge_fresh_adapter_is_exact_and_save_load(tmp_path):
    rng = np.random.default_rng(0)
    params = {"embed": np.ones((5, 4), np.float32),
              "layers": {"wq": rng.normal(size=(2, 4, 6)).astype(np.float32),
                         "wv": rng.normal(size=(2, 4, 6)).astype(np.float32)}}
    ad = lora.init(jax.random.PRNGKey(0), params, rank=3, targets=("wq",), alpha=6.0)
    merged = lora.merge(params, ad)
    np.testing.assert_array_equal(merged["layers"]["wq"], params["layers"]["wq"])  # B = 0
    ad["B"]["wq"] = ad["B"]["wq"] + 0.5
    merged = lora.merge(params, ad)
    want = params["layers"]["wq"] + 2.0 * np.einsum("ldr,lrf->ldf", np.asarray(ad["A"]["wq"]), np.asarray(ad["B"]["wq"]))
    np.testing.assert_allclose(merged["layers"]["wq"], want, rtol=1e-5)
    assert merged["layers"]["wv"] is params["layers"]["wv"]
    lora.save(ad, tmp_path / "a.npz")
    back, hdr = lora.load(tmp_path / "a.npz")
    assert hdr["rank"] == 3 and float(back["scale"]) == 2.0
    np.testing.assert_array_equal(back["B"]["wq"], ad["B"]["wq"])
    with pytest.raises(ValueError, match="dense layer matrices"):
        lora.init(jax.random.PRNGKey(0), params, rank=2, targets=("w_up",))


def test_bad_config_errors():
    with pytest.raises(ValueError, match="objective"):
        T.TrainConfig(objective="sgd")
    with pytest.raises(ValueError, match="targets"):
        T.TrainConfig(targets=("embed",))
