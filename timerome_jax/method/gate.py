"""Calibration of the gated edit memory (`memory.Gate`) on TOFU rows that no evaluation reads.

The gate fires on a token when its residual, whitened by held-out retain residuals, has a cosine
above tau with one of the memory's slot keys (`capture.capture_slot_keys`). Both the whitening and
tau come from `tofu.calibration_rows()` (full[400:3600], 160 retain authors, disjoint from every
forget split, retain_perturbed, real_authors and world_facts):

    whiten rows    n_whiten rows drawn from the calibration rows -> (mu, P) (`memory.fit_whitening`)
    thresh rows    n_thresh other calibration rows -> tau = percentile of the gate score over their
                   tokens (`memory.calibrate_tau`), so about (100 - percentile) % of held-out
                   retain tokens fire; and the same rows with the whole answer masked (probes) ->
                   tau_seq, the sequence latch's threshold (`memory.calibrate_tau_seq`: above the
                   highest held-out row's sequence score, so no held-out retain row latches)

Each row is laid out as the likelihood evaluation sees it: prompt + answer + eos, with the answer
tokens masked at a ratio t ~ U(0, 1) drawn per row (a share of rows fully masked, as generation
starts), so the residuals cover the masking states a forward will meet.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from timerome_jax.backbone.config import ModelConfig, module_id
from timerome_jax.method import capture as cap_lib
from timerome_jax.method import memory as mem_lib
from timerome_jax.tofu import data as tofu

# The default gate is the sequence latch alone: no per-token gate (`memory.Gate.token` False, tau
# stored as TAU_OFF, above any cosine); a percentile (e.g. 99.9) adds the token gate beside the latch.
DEFAULT_PERCENTILE = None
TAU_OFF = mem_lib.TAU_OFF


@dataclasses.dataclass(frozen=True)
class GateCalibration:
    """mu [D], P [R,D]: whitening; h_thresh [N,D]: residuals of the threshold rows (f32);
    h_probe [M,T,D] f32 / probe_slots [M,T] bool: the threshold rows with the whole answer (+ eos)
    masked and those slots (for the sequence latch's threshold); whiten_rows / thresh_rows: the
    global full.json indices used (for disjointness checks)."""

    mu: np.ndarray
    P: np.ndarray
    h_thresh: np.ndarray
    whiten_rows: tuple
    thresh_rows: tuple
    layer: int
    module: int
    h_probe: Optional[np.ndarray] = None
    probe_slots: Optional[np.ndarray] = None

    @property
    def whitening(self) -> tuple:
        return self.mu, self.P


def calibration_row_ids(n_whiten: int, n_thresh: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Global full.json indices of the whitening and threshold rows: two disjoint random draws from
    the calibration range (no evaluation reads them)."""
    lo, hi = tofu.CALIBRATION_RANGE
    if n_whiten < 2 or n_thresh < 1 or n_whiten + n_thresh > hi - lo:
        raise ValueError(f"calibration_row_ids: n_whiten={n_whiten} (>= 2) + n_thresh={n_thresh} (>= 1) "
                         f"must fit in the {hi - lo} calibration rows")
    perm = np.random.default_rng(seed).permutation(np.arange(lo, hi))
    return sorted(perm[:n_whiten].tolist()), sorted(perm[n_whiten:n_whiten + n_thresh].tolist())


def masked_inputs(tokenizer, cfg: ModelConfig, rows: Sequence[dict], seed: int = 0,
                  full_mask_share: float = 0.25, pad_multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """prompt + answer + eos per row, answer tokens masked at a per-row ratio t ~ U(0,1) (a share
    `full_mask_share` of rows fully masked) -> tokens [N,T] int32, pad [N,T] bool (True = real)."""
    rng = np.random.default_rng(seed)
    eos = cfg.eos_token_id
    seqs = []
    for r in rows:
        p = list(tokenizer.encode(tofu.format_prompt(r["question"])))
        a = list(tokenizer.encode(r["answer"])) + [eos]
        t = 1.0 if rng.random() < full_mask_share else rng.random()
        masked = rng.random(len(a)) < t
        a = [cfg.mask_token_id if m else x for x, m in zip(a, masked)]
        seqs.append((p + a)[: cfg.max_seq_len])
    width = -(-max(len(s) for s in seqs) // pad_multiple) * pad_multiple
    width = min(width, cfg.max_seq_len)
    tokens = np.full((len(seqs), width), cfg.pad_token_id, np.int32)
    pad = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], pad[i, : len(s)] = s, True
    return tokens, pad


def probe_inputs(tokenizer, cfg: ModelConfig, rows: Sequence[dict], pad_multiple: int = 16
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """prompt + answer + eos per row with every answer token masked (what the sequence latch probes)
    -> tokens [N,T] int32, pad [N,T] bool (True = real), slots [N,T] bool (the masked answer)."""
    if not rows:
        raise ValueError("probe_inputs: no rows")
    seqs, n_ans = [], []
    for r in rows:
        p = list(tokenizer.encode(tofu.format_prompt(r["question"])))
        a = len(tokenizer.encode(r["answer"])) + 1
        s = (p + [cfg.mask_token_id] * a)[: cfg.max_seq_len]
        seqs.append(s)
        n_ans.append((min(len(p), len(s)), len(s)))
    width = min(-(-max(len(s) for s in seqs) // pad_multiple) * pad_multiple, cfg.max_seq_len)
    tokens = np.full((len(seqs), width), cfg.pad_token_id, np.int32)
    pad = np.zeros((len(seqs), width), bool)
    slots = np.zeros((len(seqs), width), bool)
    for i, (s, (a, b)) in enumerate(zip(seqs, n_ans)):
        tokens[i, : len(s)], pad[i, : len(s)], slots[i, a:b] = s, True, True
    return tokens, pad, slots


def calibrate(params, cfg: ModelConfig, tokenizer, layer: int, module, n_whiten: int = 400,
              n_thresh: int = 400, seed: int = 0, shrink: float = 0.01, rank: Optional[int] = None,
              data_root=None) -> GateCalibration:
    """Residuals of calibration rows at (layer, module) -> whitening (mu, P) and the threshold
    rows' residuals (tau is set per memory by `memory.calibrate_tau`, since it depends on the keys)."""
    full = tofu.load_split("full", root=data_root, subjects=False)
    w_ids, t_ids = calibration_row_ids(n_whiten, n_thresh, seed)
    lo, hi = tofu.CALIBRATION_RANGE
    assert all(lo <= i < hi for i in w_ids + t_ids)
    h = {}
    for name, ids, s in (("w", w_ids, seed), ("t", t_ids, seed + 1)):
        tok, pad = masked_inputs(tokenizer, cfg, [full[i] for i in ids], seed=s)
        h[name] = cap_lib.capture_residuals(params, cfg, tok, pad, layer, module)
    mu, P = mem_lib.fit_whitening(h["w"], shrink=shrink, rank=rank)
    ptok, ppad, pslots = probe_inputs(tokenizer, cfg, [full[i] for i in t_ids])
    flat = cap_lib.capture_residuals(params, cfg, ptok, ppad, layer, module)
    h_probe = np.zeros(ptok.shape + (flat.shape[1],), np.float32)
    h_probe[ppad] = flat
    return GateCalibration(mu, P, h["t"], tuple(w_ids), tuple(t_ids), int(layer),
                           int(module_id(module)), h_probe, pslots)


__all__ = ["GateCalibration", "DEFAULT_PERCENTILE", "TAU_OFF", "calibration_row_ids", "masked_inputs", "probe_inputs",
           "calibrate"]
