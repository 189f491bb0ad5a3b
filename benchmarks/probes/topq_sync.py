"""Probe: does the edit memory's `lax.cond` in `top_q` cost a host sync per forward on the GPU?

Unstacked layout (one array per layer, unrolled layer loop), LLaDA-8B width with --layers layers,
batch 1, prompt 64 + 64 generated tokens, --steps denoising steps, edit |F| = 400, q = 4 at the
middle layer. Variants of `memory.top_q` swapped in before tracing:
  cond     a `lax.cond` between top_k and a full sort when C > TOPQ_FAST (the library's before
           it chose per platform)
  select   both thresholds computed, `jnp.where` picks (no conditional)
  sort     the full sort only
  library  `memory.top_q` as it is now (per platform: on GPU the sort for C > TOPQ_FAST)
Prints per-variant step time, the edit's overhead over no edit (paired runs) and how many
`conditional` ops each compiled program holds; writes the same as JSON to --out.

    python benchmarks/probes/topq_sync.py --out /tmp/topq.json            # GPU
    python benchmarks/probes/topq_sync.py --out /tmp/topq.json --tiny     # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from generation_ab import timed_variants  # noqa: E402
from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.method import memory as mem_lib  # noqa: E402

def _thresholded(thr_fn):
    """A top_q whose q-th largest |c| comes from thr_fn(a, q, n, k) (the keep rule is top_q's)."""
    def top_q(c, q):
        q = jnp.asarray(q, jnp.int32)
        a = jnp.abs(c)
        n = c.shape[-1]
        thr = thr_fn(a, q, n, min(n, mem_lib.TOPQ_FAST))
        keep = (q <= 0) | (a >= thr[..., None])
        return jnp.where(keep, c, jnp.zeros_like(c))
    return top_q


def _fast(a, q, n, k):
    return jnp.take(jax.lax.top_k(a, k)[0], jnp.clip(q - 1, 0, k - 1), axis=-1)


def _sorted(a, q, n, k):
    return jnp.take(jnp.sort(a, axis=-1), jnp.clip(n - q, 0, n - 1), axis=-1)


top_q_cond = _thresholded(lambda a, q, n, k: _fast(a, q, n, k) if k == n else jax.lax.cond(
    q <= k, lambda a, q: _fast(a, q, n, k), lambda a, q: _sorted(a, q, n, k), a, q))
top_q_select = _thresholded(lambda a, q, n, k: jnp.where(q <= k, _fast(a, q, n, k), _sorted(a, q, n, k)))
top_q_sort = _thresholded(_sorted)


VARIANTS = {"cond": top_q_cond, "select": top_q_select, "sort": top_q_sort, "library": mem_lib.top_q}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--facts", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    cfg = C.model_config(args.tiny).replace(n_layers=2 if args.tiny else args.layers)
    params = model_lib.unstack(C.init_params(jax.random.key(0), cfg, C.default_init_std(args.tiny)))
    layer = cfg.n_layers // 2
    mem = mem_lib.build(*(np.random.default_rng(1).standard_normal((3, args.facts, cfg.d_model)).astype(np.float32)),
                        lam=float(cfg.d_model), alpha=1.0, q=4, layer=layer, module="resid", step=-1,
                        fingerprint="probe")
    rec = {"device": jax.devices()[0].device_kind, "layers": cfg.n_layers, "steps": args.steps, "facts": args.facts,
           "variants": {}}
    for r in timed_variants(params, cfg, mem, args.steps, mem_lib, "top_q", VARIANTS, args.repeats,
                            np.random.default_rng(2)):
        name, mn, me, n_cond = r["name"], r["no_edit"], r["edit"], r["program"].as_text().count(" conditional(")
        rec["variants"][name] = {"compile_s": r["compile_s"], "conditionals_in_hlo": n_cond,
                                 "step_ms_no_edit": 1e3 * mn["steady_s"] / args.steps,
                                 "step_ms_edit": 1e3 * me["steady_s"] / args.steps,
                                 "overhead_pct_median_ratio": 100 * (float(np.median(r["ratios"])) - 1),
                                 "tokens": np.asarray(me["out"]).tolist()}
        v = rec["variants"][name]
        print(f"[topq] {name}: conditionals {n_cond}, step {v['step_ms_no_edit']:.3f} -> {v['step_ms_edit']:.3f} ms, "
              f"overhead {v['overhead_pct_median_ratio']:.2f}% (compile {r['compile_s']:.1f} s)", flush=True)
    toks = {k: v.pop("tokens") for k, v in rec["variants"].items()}
    rec["tokens_equal_to_cond"] = {k: toks[k] == toks["cond"] for k in toks}
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
