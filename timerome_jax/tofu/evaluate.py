"""TOFU evaluation of a masked diffusion LM (optionally under an intervention / edit memory).

`evaluate(params, cfg, tokenizer, split="forget01", ...)` scores four evaluation sets

    forget  = <split>_perturbed          (question, answer, paraphrased_answer, perturbed_answer[5])
    retain  = retain_perturbed           (same fields; full[:400], the same for every split)
    ra      = real_authors_perturbed     (question, answer, perturbed_answer[3])
    wf      = world_facts_perturbed      (question, answer, perturbed_answer[3])

and reports, per seed (metric names, `metrics=` accepts these, or the groups in `GROUPS`):

    forget_lp, retain_lp, ra_lp, wf_lp   mean over the set of the MC ELBO of log p(answer + EOS |
                                         prompt), summed over answer tokens (nats): the paper's
                                         Table I ForgetLP / RetainLP / RealAuth / WorldFact
    forget_prob, retain_prob             mean P̄(answer), P̄ = exp(ELBO / |answer|)
    ra_prob, wf_prob                     mean P̄(a) / (P̄(a) + Σ_j P̄(â_j))   (normalised)
    forget_tr                            mean min(TR, 1/TR), TR = GM_j P̄(perturbed_j) / P̄(paraphrased)
    retain_tr                            mean max(0, 1 − TR), same TR
    ra_tr, wf_tr                         mean max(0, 1 − TR), TR with the answer in place of a paraphrase
    forget_rouge, ... wf_rouge           mean ROUGE-L recall of a greedy generation vs the answer
    forget_quality                       KS p-value of this model's per-sample forget TRs vs the retain
                                         model's (`retain_tr`), one per seed; None when they are not
                                         given. Never averaged over seeds: the result's
                                         "forget_quality_pooled" is one KS test on the per-row
                                         geometric mean of TR over seeds (`metrics.pooled_forget_quality`)
    model_utility                        hmean of the nine retain/ra/wf prob, rouge, tr numbers

Every likelihood is `likelihood.elbo` (fixed n_mc; its masks depend only on the PRNG key and an
example id). The example id of an answer is derived from the question's identity (its index in
full.json for forget/retain rows, so forget01 row 0 and forget10 row 360 share masks) and the
answer variant, never from the batch it lands in. So two models (or an edit vs no edit) evaluated
with the same seed see identical masks: the paired comparisons over seeds use common random
numbers. Answers are encode(answer) + [eos] (TOFU counts the end token in |a|).

ROUGE uses `sampler.generate_text` (default: greedy, low-confidence remasking). A deterministic
sampler (temperature 0 and no random remasking) gives the same text for every seed, so it runs once
and its ROUGE is shared by all seeds.

`intervene` (an `Intervene`, e.g. with an edit memory) is passed unchanged to every ELBO forward
and to generation. Its batch-shaped fields must broadcast against any batch ([1, 1, D] noise, say),
because evaluation batches differ in size and length.

Results keep per-sample values in open-unlearning's shape:
    result["per_seed"][seed][metric] = {"agg_value": x, "value_by_index": {row: {...}}}
with row = the row index in the evaluated set (as a string), so a retain model's forget TRs can be
stored (`forget_tr_by_index`) and used for Forget Quality later.

`timerome_jax.tofu.report` turns several methods' results into the paper's table; the retain
model's truth ratios (the Forget Quality reference) come from `timerome_jax.tofu.reference`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from timerome_jax.backbone.tokenizer import eos_or_default
from timerome_jax.diffusion import likelihood
from timerome_jax.diffusion.sampler import SamplerConfig, generate_text
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu import metrics as M
from timerome_jax.tofu.truth_ratios import load_retain_tr

SETS = ("forget", "retain", "ra", "wf")
SET_FILES = {"retain": "retain_perturbed", "ra": "real_authors_perturbed", "wf": "world_facts_perturbed"}
KINDS = ("lp", "prob", "tr", "rouge")
ALL_METRICS = tuple(f"{s}_{k}" for s in SETS for k in KINDS) + ("forget_quality", "model_utility")
GROUPS = {
    "lp": tuple(f"{s}_lp" for s in SETS),
    "prob": tuple(f"{s}_prob" for s in SETS),
    "truth_ratio": tuple(f"{s}_tr" for s in SETS),
    "rouge": tuple(f"{s}_rouge" for s in SETS),
    "table1": ("forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_quality"),
    "tofu": ("forget_prob", "forget_tr", "forget_rouge", "forget_quality", "model_utility"),
    "all": ALL_METRICS,
}
DEFAULT_METRICS = ("forget_lp", "retain_lp", "ra_lp", "wf_lp", "prob", "truth_ratio", "rouge",
                   "forget_quality", "model_utility")

_SET_CODE = {"full": 1, "ra": 2, "wf": 3}
_N_VARIANTS = 8  # answer, paraphrase, up to 6 perturbed answers


def default_sampler(gen_length: int = 128):
    """Greedy MDLM decoding for ROUGE: steps = gen_length / 4 (4 tokens per step, sized for CPU),
    blocks of 32, low-confidence remasking (the same as `timerome eval`'s defaults)."""
    return SamplerConfig(steps=max(1, gen_length // 4), block_length=min(32, gen_length), temperature=0.0,
                         remasking="low_confidence")


def expand_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """Metric names and groups -> the ordered tuple of metric names (dependencies not included)."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    out = []
    for m in metrics:
        if m in GROUPS:
            out.extend(GROUPS[m])
        elif m in ALL_METRICS:
            out.append(m)
        else:
            raise ValueError(f"unknown metric {m!r}; expected one of {ALL_METRICS} or a group {tuple(GROUPS)}")
    return tuple(dict.fromkeys(out))


def _needs(metrics: tuple[str, ...]) -> dict[str, set]:
    """Which per-set quantities the metrics need: set -> subset of {answer, tr, rouge}."""
    want = set(metrics)
    if "model_utility" in want:
        want |= set(M.MU_KEYS)
    if "forget_quality" in want:
        want.add("forget_tr")
    need = {s: set() for s in SETS}
    for m in want:
        if m in ("forget_quality", "model_utility"):
            continue
        s, k = m.split("_", 1)
        if k == "lp" or (k == "prob" and s in ("forget", "retain")):
            need[s].add("answer")
        elif k == "prob" or k == "tr":  # ra/wf prob uses answer + perturbed, like their tr
            need[s].add("tr")
        elif k == "rouge":
            need[s].add("rouge")
    return need


def _eval_rows(split: str, which: str, limit: Optional[int], root=None) -> list[dict]:
    name = f"{split}_perturbed" if which == "forget" else SET_FILES[which]
    rows = tofu.load_split(name, root=root, subjects=False)
    if which in ("forget", "retain"):  # global index in full.json, for example ids
        off = tofu.full_offset(name)
        for r in rows:
            r["_qid"] = (_SET_CODE["full"], off + r["index"])
    else:
        for r in rows:
            r["_qid"] = (_SET_CODE[which], r["index"])
    return rows if limit is None else [rows[i] for i in spread_rows(len(rows), limit)]


def spread_rows(n: int, limit: Optional[int]) -> list[int]:
    """The positions of the `limit` rows (of `n`) that a limited evaluation reads: evenly spread,
    position floor((i + 1/2) * n / limit) for i < limit, all n rows when limit is None or >= n.

    TOFU sets hold 20 questions per author in author order, so 40 of retain_perturbed's 400 rows
    are 2 from each of its 20 authors (the first 40 rows would be 2 authors only)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    return [int((i + 0.5) * n // limit) for i in range(limit)]


def _example_id(qid: tuple[int, int], variant: int) -> int:
    code, idx = qid
    return (code * 100_000 + idx) * _N_VARIANTS + variant


@dataclasses.dataclass
class _Item:
    which: str
    row: int           # position in the evaluated rows
    variant: int       # 0 = answer, 1 = paraphrased answer (forget/retain), 2 + j = perturbed j
    prompt: list
    answer: list       # with EOS
    eid: int


def _items(rows_by_set, need, tokenizer, eos: int) -> list[_Item]:
    items, enc = [], {}

    def e(text):
        if text not in enc:
            enc[text] = list(tokenizer.encode(text))
        return enc[text]

    for which in SETS:
        nd = need[which]
        if not nd & {"answer", "tr"}:
            continue
        for i, r in enumerate(rows_by_set[which]):
            variants = []
            if "answer" in nd or ("tr" in nd and which in ("ra", "wf")):
                variants.append((0, r["answer"]))
            if "tr" in nd:
                if which in ("forget", "retain"):
                    variants.append((1, r["paraphrased_answer"]))
                if len(r["perturbed_answer"]) > _N_VARIANTS - 2:
                    raise ValueError(f"{which} row {i}: {len(r['perturbed_answer'])} perturbed answers, "
                                     f"at most {_N_VARIANTS - 2} supported")
                variants += [(2 + j, a) for j, a in enumerate(r["perturbed_answer"])]
            p = e(tofu.format_prompt(r["question"]))
            for v, a in variants:
                items.append(_Item(which, i, v, p, e(a) + [eos], _example_id(r["_qid"], v)))
    return items


def _bucket(n: int, q: int) -> int:
    return int(math.ceil(n / q) * q)


def _batches(items: list[_Item], batch_size: int, max_seq_len: int, q: int):
    """Length-sorted batches (fixed by the data alone) with a bucketed length (few compiles)."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i].prompt) + len(items[i].answer), i))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        L = max(len(items[i].prompt) + len(items[i].answer) for i in idx)
        if L > max_seq_len:
            raise ValueError(f"an evaluation example has {L} tokens (prompt + answer + EOS), more than "
                             f"cfg.max_seq_len={max_seq_len}")
        yield idx, min(_bucket(L, q), max_seq_len)


def _score_items(params, cfg, items, key, n_mc, batch_size, intervene, estimator, mc_batch, progress, desc, q):
    """ELBO [N] float64 for every item (batched; the last batch is padded with repeats)."""
    out = np.full(len(items), np.nan)
    batches = list(_batches(items, batch_size, cfg.max_seq_len, q))
    for idx, L in _tqdm(batches, progress, desc):
        pad = idx + [idx[-1]] * (batch_size - len(idx))  # constant batch shape
        toks, amask, pmask = likelihood.make_qa_batch([items[i].prompt for i in pad],
                                                      [items[i].answer for i in pad], cfg, max_len=L)
        eids = np.array([items[i].eid for i in pad], np.int32)
        ll = likelihood.elbo(params, cfg, toks, amask, pmask, key, n_mc=n_mc, example_ids=eids,
                             intervene=intervene, estimator=estimator, mc_batch=mc_batch)
        out[idx] = np.asarray(ll, np.float64)[: len(idx)]
    if not np.all(np.isfinite(out)):
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise FloatingPointError(f"non-finite ELBO for {items[bad].which} row {items[bad].row} "
                                 f"variant {items[bad].variant}")
    return out


def _generate(params, cfg, tokenizer, rows_by_set, need, gen_length, scfg, seed, batch_size, intervene,
              progress, q) -> dict[str, list[str]]:
    jobs = [(w, i, tofu.format_prompt(r["question"])) for w in SETS if "rouge" in need[w]
            for i, r in enumerate(rows_by_set[w])]
    lens = [len(tokenizer.encode(p)) for _, _, p in jobs]
    order = sorted(range(len(jobs)), key=lambda j: (lens[j], j))
    gens: dict[str, list] = {w: [None] * len(rows_by_set[w]) for w in SETS if "rouge" in need[w]}
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in _tqdm(chunks, progress, f"generate (seed {seed})"):
        pad = idx + [idx[-1]] * (batch_size - len(idx))
        longest = max(lens[j] for j in idx)
        # bucketed canvas length (few compiles), never below what the batch needs
        T = max(min(_bucket(longest, q) + gen_length, cfg.max_seq_len), longest + gen_length)
        texts = generate_text(params, cfg, tokenizer, [jobs[j][2] for j in pad], gen_length, scfg,
                              seed=seed, intervene=intervene, max_len=T)
        for j, t in zip(idx, texts):
            gens[jobs[j][0]][jobs[j][1]] = t
    return gens


def _tqdm(it, progress, desc):
    if not progress:
        return it
    return tqdm(it, desc=desc, leave=False)


def _deterministic(scfg) -> bool:
    return scfg.temperature == 0 and scfg.remasking not in ("random", "origin") and scfg.alg_temp == 0


def _retain_tr_for(retain_tr, seed: int, index_keys: list[str]):
    """The retain model's per-sample forget TRs for `seed`, aligned with `index_keys` (or None).
    retain_tr: as `evaluate` takes it, a file path already read (`load_retain_tr`)."""
    if retain_tr is None:
        return None, None
    used = None
    if isinstance(retain_tr, Mapping) and retain_tr and all(isinstance(v, (Mapping, list, tuple, np.ndarray))
                                                            for v in retain_tr.values()):
        by_seed = {int(k): v for k, v in retain_tr.items()}
        used = seed if seed in by_seed else min(by_seed)
        retain_tr = by_seed[used]
    if isinstance(retain_tr, Mapping):
        missing = [k for k in index_keys if k not in retain_tr]
        if missing:
            raise ValueError(f"retain_tr has no truth ratio for forget rows {missing[:5]}")
        return np.array([retain_tr[k] for k in index_keys], np.float64), used
    arr = np.asarray(retain_tr, np.float64)
    if arr.ndim != 1 or arr.size < len(index_keys):
        raise ValueError(f"retain_tr must have one truth ratio per forget row ({len(index_keys)}), got shape {arr.shape}")
    return arr[[int(k) for k in index_keys]], used


def evaluate(params, cfg, tokenizer, split: str = "forget01", metrics: Sequence[str] = DEFAULT_METRICS,
             n_mc: int = 16, seeds: Sequence[int] = (0,), intervene=None, retain_tr=None,
             batch_size: int = 16, gen_length: int = 128, sampler=None, progress: bool = True,
             limit: Optional[int] = None, estimator: str = "auto", mc_batch: Optional[int] = None,
             gen_batch_size: Optional[int] = None, length_bucket: int = 32, data_root=None) -> dict:
    """Evaluate a model on TOFU `split` (forget01/05/10) for each seed. See the module docstring.

    params/cfg: model; tokenizer: .encode/.decode/.eos_id (None -> cfg.eos_token_id).
    metrics: names/groups (`ALL_METRICS`, `GROUPS`); model_utility and forget_quality pull in what
        they need. retain_tr: the retain model's per-sample forget TRs: {row: tr}, {seed: {row: tr}},
        a list indexed by row, or a JSON path written by `save_retain_tr`; the seed's own entry is
        used when present, else the lowest seed's.
    limit: evaluate only `limit` rows of every set, spread evenly over it (`spread_rows`: every
        author of a TOFU set contributes), for quick runs; None = every row (the TOFU protocol).
    length_bucket: batch lengths are rounded up to a multiple of it (capped at cfg.max_seq_len), so
        a whole evaluation compiles only a few shapes; batches are length-sorted, padded to
        `batch_size` with repeats (discarded). gen_batch_size: generation batch (default batch_size).
    data_root: TOFU folder (None = packaged copy; see `tofu.load_split`).
    sampler: a `sampler.SamplerConfig` for ROUGE generation (default `default_sampler(gen_length)`).
    Returns a JSON-serialisable dict: {"split", "seeds", "n_mc", ..., "metrics": {name: [value per
    seed]}, "per_seed": {seed: {name: {"agg_value", "value_by_index"}}}, "generations": ...}.
    """
    if split not in tofu.FORGET_SPLITS:
        raise ValueError(f"split must be one of {tofu.FORGET_SPLITS}, got {split!r}")
    names = expand_metrics(metrics)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    if n_mc < 1 or batch_size < 1:
        raise ValueError(f"n_mc and batch_size must be >= 1, got {n_mc}, {batch_size}")
    scfg = sampler if sampler is not None else default_sampler(gen_length)
    gbs = gen_batch_size or batch_size
    eos = eos_or_default(tokenizer, cfg)
    need = _needs(names)
    if isinstance(retain_tr, (str, os.PathLike)):  # read once, not once per seed
        retain_tr = load_retain_tr(retain_tr)
    rows = {w: _eval_rows(split, w, limit, data_root) if need[w] else [] for w in SETS}
    items = _items(rows, need, tokenizer, eos)
    t0 = time.time()
    result: dict[str, Any] = {
        "split": split, "metrics_requested": list(names), "seeds": seeds, "n_mc": n_mc,
        "estimator": estimator, "limit": limit, "row_selection": "spread" if limit else "all",
        "batch_size": batch_size, "gen_length": gen_length,
        "length_bucket": length_bucket,
        "sampler": dataclasses.asdict(scfg), "intervened": intervene is not None,
        "prompt_template": tofu.PROMPT_TEMPLATE, "n_rows": {w: len(rows[w]) for w in SETS if need[w]},
        "per_seed": {}, "generations": {},
    }
    gens_shared = None
    fq_mine, fq_ref = [], {}  # per-seed forget TRs of this model / of the reference, for the pooled FQ
    for seed in seeds:
        per: dict[str, dict] = {}
        if items:
            ll = _score_items(params, cfg, items, jax.random.PRNGKey(seed), n_mc, batch_size, intervene,
                              estimator, mc_batch, progress, f"ELBO (seed {seed})", length_bucket)
            _fill_likelihood_metrics(per, items, ll, rows, need)
        if any("rouge" in need[w] for w in SETS):
            if gens_shared is not None:
                gens = gens_shared
            else:
                gens = _generate(params, cfg, tokenizer, rows, need, gen_length, scfg, seed, gbs, intervene,
                                 progress, length_bucket)
                if _deterministic(scfg):
                    gens_shared = gens
                result["generations"][str(seed)] = gens
            for w, texts in gens.items():
                refs = [r["answer"] for r in rows[w]]
                rec = M.rouge_l_recall(refs, texts)
                per[f"{w}_rouge"] = {"agg_value": float(rec.mean()), "value_by_index": {
                    str(r["index"]): {"rouge_recall": float(v)} for r, v in zip(rows[w], rec)}}
        if "forget_quality" in names:
            keys = [str(r["index"]) for r in rows["forget"]]
            ref, used = _retain_tr_for(retain_tr, seed, keys)
            mine = [per["forget_tr"]["value_by_index"][k]["score"] for k in keys]
            per["forget_quality"] = {"agg_value": None if ref is None else M.forget_quality(mine, ref),
                                     "retain_tr_seed": used}
            fq_mine.append(mine)
            if ref is not None and used not in fq_ref:
                fq_ref[used] = ref
        if "model_utility" in names:
            per["model_utility"] = {"agg_value": M.model_utility(
                {k: per[k]["agg_value"] for k in M.MU_KEYS})}
        result["per_seed"][str(seed)] = per
    if gens_shared is not None:
        result["generations"] = {"shared": gens_shared}
    result["metrics"] = {m: [result["per_seed"][str(s)][m]["agg_value"] for s in seeds] for m in names}
    if "forget_quality" in names:
        result["forget_quality_pooled"] = {
            "agg_value": M.pooled_forget_quality(fq_mine, list(fq_ref.values())) if fq_ref else None,
            "seeds": seeds, "retain_tr_seeds": list(fq_ref), "n_rows": len(rows["forget"]),
            "method": M.POOLED_FQ_METHOD}
    result["seconds"] = round(time.time() - t0, 3)
    return result


def _fill_likelihood_metrics(per: dict, items: list[_Item], ll: np.ndarray, rows, need) -> None:
    """Turn item ELBOs into the lp/prob/tr metrics with per-sample values."""
    table: dict[tuple[str, int, int], tuple[float, int]] = {}
    for it, v in zip(items, ll):
        table[(it.which, it.row, it.variant)] = (float(v), len(it.answer))
    for w in SETS:
        nd, rs = need[w], rows[w]
        if not rs or not nd & {"answer", "tr"}:
            continue
        keys = [str(r["index"]) for r in rs]
        if "answer" in nd or ("tr" in nd and w in ("ra", "wf")):
            a_ll = np.array([table[(w, i, 0)][0] for i in range(len(rs))])
            a_n = np.array([table[(w, i, 0)][1] for i in range(len(rs))])
            a_avg = M.avg_ll(a_ll, a_n)
            per[f"{w}_lp"] = {"agg_value": float(a_ll.mean()), "value_by_index": {
                k: {"ll": float(x), "n_tokens": int(n)} for k, x, n in zip(keys, a_ll, a_n)}}
        if "tr" in nd:
            K = len(rs[0]["perturbed_answer"])
            p_avg = np.array([[M.avg_ll([table[(w, i, 2 + j)][0]], [table[(w, i, 2 + j)][1]])[0]
                               for j in range(K)] for i in range(len(rs))])
            if w in ("forget", "retain"):
                ref = np.array([M.avg_ll([table[(w, i, 1)][0]], [table[(w, i, 1)][1]])[0] for i in range(len(rs))])
            else:
                ref = a_avg
            tr = M.truth_ratio(ref, p_avg)
            agg = M.tr_forget_score(tr) if w == "forget" else M.tr_retain_score(tr)
            per[f"{w}_tr"] = {"agg_value": agg, "value_by_index": {
                k: {"score": float(t), "avg_ll_ref": float(r), "avg_ll_perturbed": [float(x) for x in p]}
                for k, t, r, p in zip(keys, tr, ref, p_avg)}}
        if w in ("forget", "retain") and "answer" in nd:
            pb = np.exp(a_avg)
            per[f"{w}_prob"] = {"agg_value": float(pb.mean()), "value_by_index": {
                k: {"prob": float(p), "avg_loss": float(-a)} for k, p, a in zip(keys, pb, a_avg)}}
        if w in ("ra", "wf") and "tr" in nd:
            npb = M.normalised_prob(a_avg, p_avg)
            per[f"{w}_prob"] = {"agg_value": float(npb.mean()), "value_by_index": {
                k: {"prob": float(p)} for k, p in zip(keys, npb)}}
