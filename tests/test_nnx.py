"""backbone/nnx.py: the NNX module holds the very same arrays, computes the same logits as the pure
forward (interventions included), and one nnx.Optimizer (adamw) step runs and lowers the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import np_params

from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch
from timerome_jax.backbone.model import forward, run
from timerome_jax.backbone.nnx import MDLM

CFG = ModelConfig(family="llada", vocab_size=96, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, rope_theta=10000.0, mask_token_id=95, pad_token_id=0, eos_token_id=1, max_seq_len=64)


def _setup():
    params = np_params(CFG, seed=0, std=0.2)
    tokens = jnp.asarray(np.random.default_rng(1).integers(2, 90, (2, 12)), jnp.int32)
    return params, tokens


# both sides jitted (eager dispatch of the layer scan is slow on CPU); the same program either way
pure_run = jax.jit(run, static_argnames=("cfg", "stop_layer"))
module_run = nnx.jit(lambda m, tokens, pad_mask=None, intervene=None, step=0: m.run(tokens, pad_mask, intervene, step))


def test_same_arrays_no_copy():
    params, _ = _setup()
    model = MDLM(params, CFG)
    mine = model.params_tree()
    want_leaves, want_def = jax.tree.flatten(params)
    got_leaves, got_def = jax.tree.flatten(mine)
    assert want_def == got_def
    for a, b in zip(want_leaves, got_leaves):
        assert a is b
        assert a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
    # every leaf is an nnx.Param of the module's state
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == len(want_leaves)


def test_identical_logits_with_and_without_interventions():
    params, tokens = _setup()
    model = MDLM(params, CFG)
    pad = jnp.ones(tokens.shape, bool).at[1, -3:].set(False)
    np.testing.assert_array_equal(module_run(model, tokens, pad).logits, pure_run(params, tokens, CFG, pad).logits)
    noise = 0.5 * jax.random.normal(jax.random.PRNGKey(2), (2, 12, CFG.d_model))
    patch = Patch(layer=jnp.int32(1), step=jnp.int32(3), module=jnp.int32(2), pos=jnp.array([[2, 3], [4, 5]]),
                  valid=jnp.ones((2, 2), bool), value=jnp.ones((2, 2, CFG.d_model)))
    iv = Intervene(noise=noise, read_pos=jnp.array([[0, 1], [2, 3]]), patch=patch)
    out_m, out_f = module_run(model, tokens, None, iv, 3), pure_run(params, tokens, CFG, None, iv, 3)
    np.testing.assert_array_equal(out_m.logits, out_f.logits)
    assert not np.allclose(out_m.logits, pure_run(params, tokens, CFG).logits)  # the intervention acts
    for k in ("resid", "attn", "mlp"):
        np.testing.assert_array_equal(out_m.acts[k], out_f.acts[k])
        assert out_m.acts[k].shape == (CFG.n_layers, 2, 2, CFG.d_model)


@pytest.mark.slow  # compiles a value_and_grad + adamw step
def test_one_optimizer_step_runs_and_lowers_the_loss():
    params, tokens = _setup()
    model = MDLM(params, CFG)
    masked = jnp.zeros(tokens.shape, bool).at[:, 4:9].set(True)
    x = jnp.where(masked, CFG.mask_token_id, tokens)

    def loss_fn(m):  # the MDLM objective at one masking: cross-entropy on the masked tokens
        logp = jax.nn.log_softmax(m(x), -1)
        nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
        return jnp.sum(nll * masked) / jnp.sum(masked)

    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(m, o):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    snapshot = {k: np.asarray(v) for k, v in params["layers"].items()}
    before = float(train_step(model, opt))  # the loss at the initial params, then one update
    after = float(train_step(model, opt))  # the loss after that update
    assert np.isfinite(before) and after < before
    # __call__ is the pure forward: the same loss from the plain params tree
    pure_logits = jax.jit(forward, static_argnames="cfg")(params, x, CFG)
    logp = jax.nn.log_softmax(pure_logits, -1)
    pure = -jnp.sum(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0] * masked) / jnp.sum(masked)
    assert np.isclose(float(pure), before, rtol=1e-5)
    # the module now holds new arrays; the caller's params tree is untouched
    assert int(opt.step[...]) == 2
    assert not np.array_equal(model.params_tree()["layers"]["wq"], params["layers"]["wq"])
    for k, v in snapshot.items():
        np.testing.assert_array_equal(params["layers"][k], v)
