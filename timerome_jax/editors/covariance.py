"""Second moments of MLP keys, C = E[k k^T] over retain text, float64, cached per (model, layer).

ROME (Meng et al., 2022, Eq. 2 and `layer_stats`) and MEMIT (Meng et al., 2023, Eq. 14,
`mom2_update_weight`) weight their least-squares update by the uncentred second moment of the
keys (the inputs of the MLP down projection) over generic text, so that the edit disturbs the
outputs of typical keys as little as possible; AlphaEdit (Fang et al., 2025, "AlphaEdit:
Null-Space Constrained Knowledge Editing", §3) takes the null space of the same statistic as the
set of directions an edit may write to.

Our generic text is TOFU's calibration rows (`tofu.data.calibration_rows()`: rows no evaluation
reads): prompt + answer with the answer masked at a random ratio t ~ U(0.1, 1) (one draw per row),
keys at every real token. The statistic is accumulated in float64 on the host and cached as
`<cache_dir>/cov_<fingerprint>_L<layer>_r<rows hash>_n<rows>_s<seed>.npz`.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from timerome_jax.backbone.config import ModelConfig
from timerome_jax.diffusion.likelihood import make_qa_batch
from timerome_jax.editors.states import mlp_keys
from timerome_jax.io import atomic_path
from timerome_jax.method.capture import model_fingerprint
from timerome_jax.tofu import data as tofu

DEFAULT_CACHE = Path(os.environ.get("TIMEROME_CACHE", Path.home() / ".cache" / "timerome-jax")) / "covariance"


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _moments(params, tokens, answer, pad, key, cfg: ModelConfig, layer: int):
    t = jax.random.uniform(key, (tokens.shape[0], 1), minval=0.1, maxval=1.0)
    masked = answer & (jax.random.uniform(jax.random.fold_in(key, 1), tokens.shape) < t)
    x = jnp.where(masked, cfg.mask_token_id, tokens)
    k = mlp_keys(params, cfg, x, pad, layer)
    w = pad.astype(jnp.float32)[..., None]
    k = (k * w).reshape(-1, k.shape[-1])
    return k.T @ k, jnp.sum(pad)


def retain_rows(task, n_rows: int) -> Optional[list]:
    """The first `n_rows` of `task.retain_rows`, or None (= the calibration rows) when it has none."""
    return list(task.retain_rows)[:n_rows] if task.retain_rows else None


def key_second_moment(params, cfg: ModelConfig, tokenizer, layer: int, rows: Optional[Sequence[dict]] = None,
                      n_rows: int = 256, batch: int = 32, seed: int = 0, cache_dir=DEFAULT_CACHE,
                      progress: bool = False) -> tuple[np.ndarray, int]:
    """C [F,F] float64 = mean over tokens of k k^T at `layer`, and the token count.

    rows: TOFU-style dicts (question, answer); default: the first `n_rows` of
    `tofu.data.calibration_rows()`. cache_dir None: no cache. A cached file is used when the model
    fingerprint, layer, rows (a hash of their text) and seed match.
    """
    if rows is None:
        rows = tofu.calibration_rows(subjects=False)[:n_rows]
    rows = list(rows)
    if not rows:
        raise ValueError("key_second_moment: no rows to accumulate over")
    path = None
    if cache_dir is not None:
        fp = model_fingerprint(params, cfg)
        rid = hashlib.sha1("\n".join(r["question"] + "\t" + r["answer"] for r in rows).encode()).hexdigest()[:10]
        path = Path(cache_dir) / f"cov_{fp}_L{int(layer)}_r{rid}_n{len(rows)}_s{seed}.npz"
        if path.exists():
            with np.load(path) as z:
                return z["C"].astype(np.float64), int(z["n_tokens"])
    eos = cfg.eos_token_id
    prompts = [tokenizer.encode(tofu.format_prompt(r["question"])) for r in rows]
    answers = [tokenizer.encode(r["answer"]) + [eos] for r in rows]
    F = cfg.d_ff
    C = np.zeros((F, F), np.float64)
    n_tok = 0
    key = jax.random.PRNGKey(seed)
    for i in tqdm(range(0, len(rows), batch), desc=f"key moments L{layer}", leave=False, disable=not progress):
        p, a = prompts[i:i + batch], answers[i:i + batch]
        while len(p) < batch:  # one shape per call: pad with an empty-weight copy below
            p, a = p + [p[0]], a + [a[0]]
        n_real = min(batch, len(rows) - i)
        longest = max(len(x) + len(y) for x, y in zip(p, a))
        T = min(cfg.max_seq_len, -(-longest // 32) * 32)
        tokens, answer, pad = make_qa_batch(p, a, cfg, max_len=T)
        pad = pad & (jnp.arange(batch) < n_real)[:, None]
        s, n = _moments(params, tokens, answer, pad, jax.random.fold_in(key, i), cfg, int(layer))
        C += np.asarray(s, np.float64)
        n_tok += int(n)
    C /= n_tok
    if path is not None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, C=C, n_tokens=n_tok, layer=int(layer))
    return C, n_tok
