"""JAX TIE sweep vs the PyTorch forward-hook reference (torch_ref/trace.py) on the same tiny LLaDA
checkpoint and the same noise draws: equal heatmaps to fp32 tolerance."""
import jax
import numpy as np
import pytest
import torch

from timerome_jax.backbone import hf_weights
from timerome_jax.method import trace as tr
from timerome_jax.torch_ref.trace import torch_trace


@pytest.mark.slow
def test_jax_tie_equals_torch_hooks(tiny_torch):
    model, path = tiny_torch["llada"]
    params, cfg, _ = hf_weights.load_pretrained(path)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(2, cfg.vocab_size, 7)), list(rng.integers(2, cfg.vocab_size, 5))]
    objects = [list(rng.integers(2, cfg.vocab_size, 6)), list(rng.integers(2, cfg.vocab_size, 4))]
    fb = tr.make_fact_batch(prompts, [[2, 3, 4], [1]], objects, cfg)
    tcfg = tr.TraceConfig(steps=4, n_noise=2, tau=0.5, chunk=8)
    with jax.default_matmul_precision("highest"):
        res = tr.trace(params, cfg, fb, tcfg)
    sigma = tcfg.noise_scale * float(np.std(np.asarray(params["embed"])))
    noises = [np.asarray(tr.embedding_noise(jax.random.fold_in(jax.random.key(tcfg.seed), r), fb, params, sigma))
              for r in range(tcfg.n_noise)]
    torch.manual_seed(0)
    ref = torch_trace(model.float(), fb.x0, fb.pad_mask, fb.obj, fb.obj_mask, fb.subj_pos, fb.subj_valid, noises,
                      K=tcfg.steps, mask_id=cfg.mask_token_id, tau=tcfg.tau, chunk=4)
    np.testing.assert_allclose(res.clean, ref["clean"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res.corrupted, ref["corrupted"], rtol=1e-5, atol=1e-4)
    later = ~np.isnan(res.tie)
    assert np.array_equal(later, ~np.isnan(ref["tie"]))
    np.testing.assert_allclose(res.tie[later], ref["tie"][later], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res.tie_bar, ref["tie_bar"], rtol=1e-4, atol=1e-4)
    assert np.abs(res.tie_bar).max() > 1e-3  # the comparison is not between two all-zero arrays
