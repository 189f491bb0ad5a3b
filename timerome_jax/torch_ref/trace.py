"""PyTorch forward-hook reference of TIE tracing (paper §III-A, §III-E), the way the paper runs it.

Same definitions as `timerome_jax.method.trace` (read its docstring for Eq. 3's log p(o | x_k')), computed
with hooks on a torch model: a `CaptureHook` per (layer, module) on the clean trajectory, an
embedding hook that adds the subject noise (Eq. 2) on the corrupted one, and for the patched runs one
`PatchHook` per candidate. Candidates that patch the same step k are stacked along the batch (rows =
candidates x facts, in chunks) and run from the stored corrupted canvas of step k (the prefix steps
are shared, as in the JAX sweep), so this is the batched hook loop, not a per-candidate strawman.

Used by the cross-framework tests (tiny models, fp32, CPU) and by the GPU benchmarks (8B, bf16).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from timerome_jax.torch_ref.hooks import CaptureHook, PatchHook, TraceState, installed, locate

EMBED_PATHS = ("model.transformer.wte", "model.embed_tokens")


def _embedding(model):
    for path in EMBED_PATHS:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ValueError(f"cannot find the token embedding of {type(model).__name__} (tried {EMBED_PATHS})")


class _AddNoise:
    """Forward hook on the embedding: output + noise [B,T,D] (the rows of the current batch)."""

    def __init__(self, noise):
        self.noise = noise

    def __call__(self, mod, inputs, output):
        return output + self.noise.to(output.device, output.dtype)


def n_transfer(gen_counts: torch.Tensor, K: int) -> torch.Tensor:
    """LLaDA get_num_transfer_tokens for one block: [B] counts -> [B, K]."""
    base = gen_counts[:, None] // K
    extra = (torch.arange(K, device=gen_counts.device)[None] < (gen_counts % K)[:, None]).long()
    return base + extra


def commit(logits, x, gen_mask, k_row, mask_id: int):
    """LLaDA low-confidence remasking at temperature 0 (mask token banned from the argmax), ties to
    the lower position: the rule of `timerome_jax.diffusion.sampler` with one block."""
    lg = logits.float().clone()
    lg[..., mask_id] = -torch.inf
    x0 = lg.argmax(-1)
    conf = torch.exp(lg.gather(-1, x0[..., None])[..., 0] - torch.logsumexp(lg, -1))
    cand = gen_mask & (x == mask_id)
    conf = torch.where(cand, conf, torch.full_like(conf, -torch.inf))
    order = torch.sort(-conf, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
    sel = cand & (rank < k_row[:, None])
    return torch.where(sel, x0, x)


def _step(model, x, lpf, pad, obj, obj_mask, gen, k_row, mask_id):
    logits = model(x, attention_mask=pad.long())
    lp = torch.log_softmax(logits.float(), -1).gather(-1, obj[..., None])[..., 0]
    lpf = torch.where((x == mask_id) & obj_mask, lp, lpf)
    score = torch.where(obj_mask, lpf, torch.zeros_like(lpf)).sum(-1)
    return commit(logits, x, gen, k_row, mask_id), lpf, score


@torch.no_grad()
def torch_trace(model, x0, pad_mask, obj, obj_mask, subj_pos, subj_valid, noises, K: int, mask_id: int,
                tau: float, chunk: Optional[int] = None, device=None) -> dict:
    """TIE sweep with hooks. Arrays as in `trace.FactBatch` (NumPy or torch), `noises`: list of
    [B,T,D] embedding-noise arrays (one per draw, e.g. the JAX ones). chunk: candidates per batch
    (default all 3L of a step). Returns tie [B,3,L,K,K] (NaN where k' <= k), tie_bar [B,3,L,K],
    clean [B,K], corrupted [R,B,K] as NumPy float64."""
    t = lambda a, dt=None: torch.as_tensor(np.array(a), device=device, dtype=dt)
    x0, pad, obj = t(x0, torch.long), t(pad_mask, torch.bool), t(obj, torch.long)
    obj_mask, subj_pos, subj_valid = t(obj_mask, torch.bool), t(subj_pos, torch.long), t(subj_valid, torch.bool)
    loc = locate(model)
    L = loc.n_layers(model)
    B = x0.shape[0]
    gen = (x0 == mask_id) & pad
    k_sched = n_transfer(gen.sum(1), K)
    emb = _embedding(model)

    # clean trajectory: capture every (layer, module) on the subject at every step
    state = TraceState()
    caps = [CaptureHook(l, m, subj_pos, state=state, to_cpu=False) for m in range(3) for l in range(L)]
    x, lpf, clean_scores = x0, torch.zeros(x0.shape, device=x0.device), []
    with installed(model, *caps, locator=loc):
        for k in range(K):
            state.step = k
            x, lpf, s = _step(model, x, lpf, pad, obj, obj_mask, gen, k_sched[:, k], mask_id)
            clean_scores.append(s)
    clean = {(l, m): torch.stack([v for _, v in caps[m * L + l].records]) for m in range(3) for l in range(L)}

    tie = np.zeros((B, 3, L, K, K))
    corrupted = []
    cands = [(l, m) for m in range(3) for l in range(L)]
    chunk = chunk or len(cands)
    for noise in noises:
        noise = t(noise, torch.float32)
        xs, lpfs, cs = [], [], []
        x, lpf = x0, torch.zeros(x0.shape, device=x0.device)
        h = emb.register_forward_hook(_AddNoise(noise))
        try:
            for k in range(K):
                xs.append(x)
                lpfs.append(lpf)
                x, lpf, s = _step(model, x, lpf, pad, obj, obj_mask, gen, k_sched[:, k], mask_id)
                cs.append(s)
        finally:
            h.remove()
        cs = torch.stack(cs)  # [K, B]
        corrupted.append(cs.T.cpu().numpy())
        for k in range(K):
            for c0 in range(0, len(cands), chunk):
                group = cands[c0:c0 + chunk]
                n = len(group)
                rep = lambda a: a.repeat((n,) + (1,) * (a.ndim - 1))
                state = TraceState(k)
                hooks = []
                for i, (l, m) in enumerate(group):
                    valid = torch.zeros((n * B,) + subj_valid.shape[1:], dtype=torch.bool, device=x0.device)
                    valid[i * B:(i + 1) * B] = subj_valid
                    hooks.append(PatchHook(l, k, m, rep(subj_pos), rep(clean[(l, m)][k]), valid, state=state))
                x, lpf = rep(xs[k]), rep(lpfs[k])
                args = (rep(pad), rep(obj), rep(obj_mask), rep(gen))
                h = emb.register_forward_hook(_AddNoise(rep(noise)))
                try:
                    with installed(model, *hooks, locator=loc):
                        for kk in range(k, K):
                            state.step = kk
                            x, lpf, s = _step(model, x, lpf, *args, rep(k_sched[:, kk]), mask_id)
                            d = (s.view(n, B) - cs[kk][None]).cpu().numpy()
                            for i, (l, m) in enumerate(group):
                                tie[:, m, l, k, kk] += d[i] / len(noises)
                finally:
                    h.remove()
    w = np.zeros((K, K))
    for k in range(K):
        e = np.exp(-tau * (np.arange(k + 1, K + 1) - k))
        w[k, k:] = e / e.sum()
    later = w > 0
    tie_bar = np.sum(np.where(later, tie, 0.0) * w, -1)
    return {"tie": np.where(later, tie, np.nan), "tie_bar": tie_bar,
            "clean": torch.stack(clean_scores).T.cpu().numpy(), "corrupted": np.stack(corrupted)}
