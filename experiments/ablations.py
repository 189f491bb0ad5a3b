"""The paper's Fig. 5 design ablations for an inference-time edit memory, on the packaged TOFU model.

    PYTHONPATH=$PWD python experiments/ablations.py --out results/ablations \
        [--builder timerome_jax.pipeline:install] [--alpha 2 --q 4] [--seeds 0 1 2 --n-mc 4 --limit 40]

Arms (every one builds the memory for all forget facts with the same builder, alpha, q, lambda rule):
  module   resid vs attn vs mlp at the TIE-selected layer, every denoising step (k* = -1);
  steps    every step vs step k = 2 only (of K = 8) at the TIE coordinate;
  site     the TIE-selected layer (resid) vs a random other layer (resid, seeded) vs the AR-positional
           site (the MLP output of the layer ROME's token-position trace picks: `editors.locate`).
The TIE coordinate is read from docs/demo/demo.json (--coord-json; written by `timerome demo`).

--builder "module:function": a callable (params, cfg, tokenizer, facts, coord, alpha=, q=) ->
(edit pytree, info dict), with coord a `trace.Coordinate`; the default is `pipeline.install` (Eq. 12).
A gated memory with that signature plugs in unchanged.

Metrics: forget/retain/ra/wf log-probability (MC ELBO) and forget/retain ROUGE-L of greedy generation
with K = 8 denoising steps over 32 tokens (one block). The ELBO's forwards carry no denoising-step
index (every MC sample is scored at step 0), so a step-restricted edit only shows in generation;
the ROUGE columns are where the steps arm can differ. Writes <out>/ablations.{json,md}, <out>/table.md
(paired tests vs no_edit), ablations.png (three panels), per-arm eval JSON (reused on a rerun).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer  # noqa: E402
from timerome_jax.backbone.config import MODULES, module_id  # noqa: E402
from timerome_jax.backbone.intervene import Intervene  # noqa: E402
from timerome_jax.diffusion.sampler import SamplerConfig  # noqa: E402
from timerome_jax.editors.locate import positional_trace  # noqa: E402
from timerome_jax.io import write_json, write_text  # noqa: E402
from timerome_jax.method import facts as F  # noqa: E402
from timerome_jax.method.trace import Coordinate  # noqa: E402
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL  # noqa: E402
from timerome_jax.tofu.report import compare, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_rouge", "retain_rouge")


def load_builder(spec: str):
    mod, _, fn = spec.partition(":")
    if not fn:
        raise ValueError(f"--builder {spec!r}: expected 'module:function'")
    return getattr(importlib.import_module(mod), fn)


def arms(tie: Coordinate, n_layers: int, ar_layer: int, seed: int, k_only: int) -> dict:
    """{arm name: (group, Coordinate)} for the three ablation groups."""
    rng = np.random.default_rng(seed)
    others = [l for l in range(n_layers) if l != tie.layer]
    rand = int(rng.choice(others))
    resid = module_id("resid")
    return {
        f"resid L{tie.layer} (TIE)": ("module,steps,site", Coordinate(tie.layer, -1, resid)),
        f"attn L{tie.layer}": ("module", Coordinate(tie.layer, -1, module_id("attn"))),
        f"mlp L{tie.layer}": ("module", Coordinate(tie.layer, -1, module_id("mlp"))),
        f"resid L{tie.layer} k={k_only} only": ("steps", Coordinate(tie.layer, k_only, resid)),
        f"random layer resid L{rand}": ("site", Coordinate(rand, -1, resid)),
        f"AR positional mlp L{ar_layer}": ("site", Coordinate(ar_layer, -1, module_id("mlp"))),
    }


def plot(rows, groups, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["method"], r["metric"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (g, names) in zip(axes, groups.items()):
        x = np.arange(len(names))
        for j, (metric, color) in enumerate((("forget_lp", "tab:red"), ("retain_lp", "tab:blue"), ("ra_lp", "tab:green"))):
            d = [by[(n, metric)]["delta"] if (n, metric) in by else np.nan for n in names]
            lo = [by[(n, metric)]["delta_ci_lo"] for n in names]
            hi = [by[(n, metric)]["delta_ci_hi"] for n in names]
            err = np.array([[a - l for a, l in zip(d, lo)], [h - a for a, h in zip(d, hi)]])
            ax.bar(x + (j - 1) * 0.27, d, 0.27, yerr=err, color=color, label=f"Δ {metric}", capsize=2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_title(g)
        ax.set_ylabel("Δ vs no_edit (nats, 95% CI)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--split", default="forget01")
    ap.add_argument("--out", default="results/ablations")
    ap.add_argument("--builder", default="timerome_jax.pipeline:install")
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--k-only", type=int, default=2)
    ap.add_argument("--coord-json", default=str(ROOT / "docs/demo/demo.json"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-mc", type=int, default=4)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--gen-steps", type=int, default=8)
    ap.add_argument("--gen-length", type=int, default=32)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    build = load_builder(a.builder)
    params, cfg, tok = load_model_with_tokenizer(a.model)
    facts = F.load_facts(tok, a.split, tok.eos_id)
    demo = json.loads(Path(a.coord_json).read_text())["coordinate"]
    tie = Coordinate(int(demo["layer"]), int(demo["step"]), module_id(demo["module"]))
    t0 = time.perf_counter()
    ar_effect = positional_trace(params, cfg, facts)
    ar_layer = int(np.argmax(ar_effect))
    ar_s = time.perf_counter() - t0
    plan = arms(tie, cfg.n_layers, ar_layer, seed=0, k_only=a.k_only)
    scfg = SamplerConfig(steps=a.gen_steps, block_length=None, temperature=0.0, remasking="low_confidence")
    kw = dict(metrics=METRICS, n_mc=a.n_mc, seeds=a.seeds, limit=a.limit, batch_size=a.limit, progress=False,
              sampler=scfg, gen_length=a.gen_length)
    results, info = {}, {}
    for name, (group, coord) in [("no_edit", ("", None))] + list(plan.items()):
        path = out / f"eval_{name.replace(' ', '_').replace('=', '')}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        iv, rec = None, {}
        if coord is not None:
            t1 = time.perf_counter()
            mem, binfo = build(params, cfg, tok, facts, coord, alpha=a.alpha, q=a.q)
            rec = {"group": group, "coordinate": {"layer": coord.layer, "step": coord.step,
                                                  "module": MODULES[coord.module]},
                   "build_s": time.perf_counter() - t1, "lam": binfo.get("lam")}
            iv = Intervene(edit=mem)
        t1 = time.perf_counter()
        results[name] = ev.evaluate(params, cfg, tok, a.split, intervene=iv, **kw)
        rec["eval_s"] = time.perf_counter() - t1
        info[name] = rec
        write_json(path, results[name])
        print(name, {k: round(float(np.mean(v)), 3) for k, v in results[name]["metrics"].items()}, flush=True)
    rows = compare(results, reference="no_edit")
    write_report(rows, out, "table", reference="no_edit")
    groups = {g: [n for n, (gs, _) in plan.items() if g in gs.split(",")] for g in ("module", "steps", "site")}
    plot(rows, groups, out / "ablations.png")
    summary = {"builder": a.builder, "alpha": a.alpha, "q": a.q, "tie_coordinate": demo,
               "ar_positional": {"layer": ar_layer, "effect_per_layer": ar_effect.tolist(), "trace_s": ar_s},
               "arms": {n: {"group": g, "layer": c.layer, "step": c.step, "module": MODULES[c.module]}
                        for n, (g, c) in plan.items()},
               "groups": groups, "runs": info,
               "budget": {"split": a.split, "seeds": a.seeds, "n_mc": a.n_mc, "limit": a.limit,
                          "gen_steps": a.gen_steps, "gen_length": a.gen_length},
               "rows": rows}
    write_json(out / "ablations.json", summary)
    lines = [f"# Ablations ({a.builder}, alpha={a.alpha:g}, q={a.q})", "",
             f"TIE coordinate {demo}; AR-positional MLP layer {ar_layer} (indirect effect per layer "
             f"{np.round(ar_effect, 3).tolist()}).", "", (out / "table.md").read_text()]
    write_text(out / "ablations.md", "\n".join(lines))
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
