"""Train the packaged default models from scratch: a small LLaDA-architecture MDLM on TOFU `full`
(the *target* model) and an identical one on `retain99` (the *retain* reference for Forget Quality).

Both are trained in one jitted program (params stacked on a leading model axis and vmapped), with
LLaDA's SFT objective: the prompt is never masked; each answer-region token (answer + EOS padding)
is masked with probability p = (1-eps) t + eps, t ~ U(0,1) per example, and the loss is
sum(CE / p) over masked tokens / answer-region length, averaged over the batch
(ML-GSAI/LLaDA GUIDELINES.md, see docs/backbone_facts.md §1.7 Training objective).

Sequences are `Question: {q}\\nAnswer: ` + answer + EOS, padded with EOS (in the loss, as LLaDA
SFT does) up to a per-example random length in [len, T]; positions past it are key-padding, so the
model is used to both EOS tails and padded batches at evaluation.

Deterministic from --seed (data order, masks, init). Writes raw params (.npz, our param names),
config JSON, and the loss curve (JSONL) to --out; `experiments/package_default.py` turns them into
HF LLaDA-layout folders inside the package.

    python experiments/train_default.py --out /tmp/run --steps 12000        # GPU
    python experiments/train_default.py --out /tmp/run --steps 20 --tiny    # CPU smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timerome_jax.backbone.config import ModelConfig  # noqa: E402
from timerome_jax.io import atomic_path, write_json  # noqa: E402
from timerome_jax.backbone.model import forward, init_params  # noqa: E402
from timerome_jax.tofu.data import PROMPT_TEMPLATE as PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-3


def default_config(vocab: int, mask_id: int, eos_id: int, tiny: bool = False) -> ModelConfig:
    if tiny:
        return ModelConfig(family="llada", vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                           head_dim=16, d_ff=64, rope_theta=10000.0, mask_token_id=mask_id,
                           pad_token_id=eos_id, eos_token_id=eos_id, max_seq_len=256)
    return ModelConfig(family="llada", vocab_size=vocab, d_model=192, n_layers=6, n_heads=4, n_kv_heads=4,
                       head_dim=48, d_ff=576, rope_theta=10000.0, mask_token_id=mask_id,
                       pad_token_id=eos_id, eos_token_id=eos_id, max_seq_len=256)


def read_split(data_dir: Path, name: str) -> list[dict]:
    return [json.loads(l) for l in (data_dir / f"{name}.json").read_text().splitlines() if l.strip()]


def encode_split(tok: Tokenizer, rows, T: int, eos: int):
    """tokens [N,T] (EOS-padded), prompt_len [N], real_len [N] (prompt + answer + 1 EOS)."""
    toks = np.full((len(rows), T), eos, np.int32)
    plen, rlen = np.zeros(len(rows), np.int32), np.zeros(len(rows), np.int32)
    for i, r in enumerate(rows):
        p = tok.encode(PROMPT.format(question=r["question"])).ids
        a = tok.encode(r["answer"]).ids + [eos]
        if len(p) + len(a) > T:
            raise ValueError(f"row {i}: {len(p) + len(a)} tokens exceed T={T}")
        toks[i, : len(p) + len(a)] = p + a
        plen[i], rlen[i] = len(p), len(p) + len(a)
    return toks, plen, rlen


def sft_loss(params, cfg, tokens, plen, rlen, key):
    """LLaDA SFT loss for one model on a batch. tokens [B,T]; plen/rlen [B]."""
    B, T = tokens.shape
    k_len, k_t, k_m = jax.random.split(key, 3)
    pos = jnp.arange(T)[None]
    # random total length in [rlen, T]: EOS tail of random size, the rest is key padding
    tot = rlen + jnp.floor(jax.random.uniform(k_len, (B,)) * (T - rlen + 1)).astype(jnp.int32)
    pad_mask = pos < tot[:, None]
    region = (pos >= plen[:, None]) & pad_mask
    t = jax.random.uniform(k_t, (B, 1))
    p = (1 - EPS) * t + EPS
    masked = region & (jax.random.uniform(k_m, (B, T)) < p)
    x = jnp.where(masked, cfg.mask_token_id, tokens)
    logits = forward(params, x, cfg, pad_mask)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
    per = jnp.sum(jnp.where(masked, ce / p, 0.0), -1) / jnp.maximum(jnp.sum(region, -1), 1)
    return jnp.mean(per)


def make_train_chunk(cfg, tx, batch: int, chunk: int, n_models: int = 2):
    """A jitted chunk of `chunk` optimizer steps for `n_models` stacked models at once (vmapped model
    axis; each model samples its own rows only)."""

    def one_model_step(params, opt_state, data, key):
        toks, plen, rlen, n_rows = data
        k_idx, k_loss = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch,), 0, n_rows)
        loss, g = jax.value_and_grad(sft_loss)(params, cfg, toks[idx], plen[idx], rlen[idx], k_loss)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    step_all = jax.vmap(one_model_step)

    @jax.jit
    def run_chunk(params, opt_state, data, key):
        def body(carry, k):
            params, opt_state = carry
            params, opt_state, loss = step_all(params, opt_state, data, jax.random.split(k, n_models))
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), jax.random.split(key, chunk))
        return params, opt_state, losses.mean(0)

    return run_chunk


def mc_answer_logprob(params, cfg, toks, plen, rlen, key, n_mc=8):
    """Quick Monte-Carlo ELBO of log p(answer+EOS | prompt) per row (Bernoulli-t estimator), to
    monitor memorisation during training. The package's `likelihood.elbo` is the reference."""
    T = toks.shape[1]
    pos = jnp.arange(T)[None]
    pad_mask = pos < rlen[:, None]
    region = (pos >= plen[:, None]) & pad_mask

    def one(k):
        k_t, k_m = jax.random.split(k)
        t = (jax.random.uniform(k_t, ()) + jnp.arange(toks.shape[0])[:, None] * 0.0)
        p = (1 - EPS) * t + EPS
        masked = region & (jax.random.uniform(k_m, toks.shape) < p)
        logits = forward(params, jnp.where(masked, cfg.mask_token_id, toks), cfg, pad_mask)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), toks[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(masked, lp / p, 0.0), -1)

    return jnp.mean(jax.vmap(one)(jax.random.split(key, n_mc)), 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(ROOT / "timerome_jax" / "data" / "tofu"))
    ap.add_argument("--tokenizer", default=str(ROOT / "timerome_jax" / "assets" / "tokenizer" / "tokenizer.json"))
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--T", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-minutes", type=float, default=0.0,
                    help="if > 0: time the second chunk and lower --steps to fit this training budget "
                         "(the chosen step count is logged; rerunning with --steps N reproduces the weights)")
    ap.add_argument("--tiny", action="store_true", help="tiny model for a CPU smoke run")
    ap.add_argument("--init", default=None, help="folder with target.npz/retain.npz to continue training from "
                    "(a fresh optimizer state and schedule)")
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="activation dtype during training (params and optimizer stay float32)")
    a = ap.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(a.data)
    if not data_dir.is_dir():
        raise SystemExit(f"error: TOFU data folder {data_dir} does not exist")
    tok = Tokenizer.from_file(a.tokenizer)
    eos, mask = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|mdm_mask|>")
    cfg = default_config(tok.get_vocab_size(), mask, eos, a.tiny)
    splits = {"target": "full", "retain": "retain99"}
    enc = [encode_split(tok, read_split(data_dir, s), a.T, eos) for s in splits.values()]
    # stack both datasets on the model axis (zero-padded to the longer one); each model samples
    # only among its own n_rows rows
    N = max(len(e[0]) for e in enc)
    pad = lambda x: np.concatenate([x, np.zeros((N - len(x),) + x.shape[1:], x.dtype)])
    data = tuple(jnp.stack([pad(e[i]) for e in enc]) for i in range(3)) + (
        jnp.asarray([len(e[0]) for e in enc], jnp.int32),)

    keys = jax.random.split(jax.random.key(a.seed), 3)
    params = jax.vmap(lambda k: init_params(k, cfg))(jax.random.split(keys[0], 2))
    if a.init:  # continue from a previous stage: same tree, leaves read by their key path
        stacked = []
        for name in splits:
            z = np.load(Path(a.init) / f"{name}.npz")
            stacked.append(z)
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: jnp.stack([jnp.asarray(z[jax.tree_util.keystr(p)]) for z in stacked]).astype(v.dtype), params)
    train_cfg = cfg.replace(dtype=a.compute_dtype)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.inject_hyperparams(optax.adamw)(learning_rate=a.lr, b2=0.98, weight_decay=0.0))
    opt_state = jax.vmap(tx.init)(params)
    run_chunk = make_train_chunk(train_cfg, tx, a.batch, a.chunk)

    def lr_at(step):  # linear warm-up, cosine decay to 1% of the peak
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        frac = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(1.0, frac))))

    log_f = open(out / "train_log.jsonl", "w")
    t0, step, key = time.time(), 0, keys[1]
    while step < a.steps:
        if a.budget_minutes > 0 and step == 2 * a.chunk:  # chunk 1 compiled, chunk 2 timed
            per_step = (time.time() - t_chunk) / a.chunk
            fit = int((a.budget_minutes * 60 - (time.time() - t0)) / per_step) // a.chunk * a.chunk + step
            a.steps = max(step, min(a.steps, fit))
            print(f"calibrated: {per_step * 1e3:.1f} ms/step -> steps = {a.steps}", flush=True)
        t_chunk = time.time()
        lr = lr_at(step)
        opt_state[1].hyperparams["learning_rate"] = jnp.full((2,), lr, jnp.float32)
        key, k = jax.random.split(key)
        params, opt_state, loss = run_chunk(params, opt_state, data, k)
        step += a.chunk
        loss = np.asarray(loss)
        rec = {"step": step, "lr": float(lr), "loss_target": float(loss[0]), "loss_retain": float(loss[1]),
               "elapsed_s": round(time.time() - t0, 1)}
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        print(rec, flush=True)

    # memorisation check: mean per-token probability exp(ELBO/|a|) on forget01 and retain_perturbed
    report = {"steps_done": step, "train_seconds": round(time.time() - t0, 1), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "config": dataclasses.asdict(cfg), "seed": a.seed, "args": vars(a)}
    for split in ("forget01", "retain_perturbed"):
        toks, plen, rlen = encode_split(tok, read_split(data_dir, split), a.T, eos)
        for m, name in enumerate(splits):
            pm = jax.tree.map(lambda x: x[m], params)
            ll = np.asarray(jax.jit(mc_answer_logprob, static_argnums=1)(pm, cfg, jnp.asarray(toks), jnp.asarray(plen),
                                                                          jnp.asarray(rlen), keys[2]))
            n_ans = rlen - plen
            report[f"{name}/{split}/mean_tok_prob"] = float(np.mean(np.exp(ll / n_ans)))
            report[f"{name}/{split}/mean_lp"] = float(np.mean(ll))
    print(json.dumps(report, indent=1))
    for m, name in enumerate(splits):
        flat = {jax.tree_util.keystr(p): np.asarray(v[m]) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        with atomic_path(out / f"{name}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **flat)
    write_json(out / "config.json", dataclasses.asdict(cfg))
    write_json(out / "report.json", report)


if __name__ == "__main__":
    main()
