"""Weight editors (ROME, MEMIT, AlphaEdit) and the GRACE codebook on the packaged TOFU target model,
next to no_edit and the TimeROME edit memory, through `tofu.evaluate` and `tofu.report.compare`.

    PYTHONPATH=$PWD python experiments/run_editors.py --out results/editors \
        --methods rome memit alphaedit grace --seeds 0 1 2 --n-mc 4 --limit 40

Every method gets an `EditTask` with the split's forget rows and calibration rows as retain rows, and
is prepared through `methods.prepare` (its wall time is recorded). Each method's evaluation is
written to <out>/eval_<method>.json as soon as it finishes, and reused on a rerun (so methods can
be added one at a time); the table is <out>/table.{md,json} (`report.write_report`, paired tests vs
no_edit on shared seeds and MC masks), costs and hyperparameters in <out>/summary.json.
The TimeROME rows use the coordinate of docs/demo/demo.json (--coord-json) and the demo's two settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timerome_jax.editors  # noqa: E402,F401  (registers rome, memit, alphaedit, grace)
from timerome_jax import methods  # noqa: E402
from timerome_jax import pipeline as pl  # noqa: E402
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer  # noqa: E402
from timerome_jax.backbone.config import module_id  # noqa: E402
from timerome_jax.backbone.intervene import Intervene  # noqa: E402
from timerome_jax.editors.weights import diff_params  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402
from timerome_jax.method import facts as F  # noqa: E402
from timerome_jax.method.trace import Coordinate  # noqa: E402
from timerome_jax.tofu import data as tofu  # noqa: E402
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL  # noqa: E402
from timerome_jax.tofu.reference import cached_retain_tr  # noqa: E402
from timerome_jax.tofu.report import compare, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_hp(items):
    """["rome.steps=40", "grace.eps=2"] -> {"rome": {"steps": 40}, "grace": {"eps": 2.0}} (JSON values)."""
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        m, _, name = k.partition(".")
        if not name:
            raise ValueError(f"--hp {it!r}: expected method.name=value")
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        out.setdefault(m, {})[name] = val
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--split", default="forget01")
    ap.add_argument("--out", default="results/editors")
    ap.add_argument("--methods", nargs="+", default=["rome", "memit", "alphaedit", "grace"],
                    help="registered names, or label=name to run a method twice with different --hp label.x=...")
    ap.add_argument("--timerome", nargs="*", default=["0.5,2", "2,4"], help="alpha,q settings of the memory")
    ap.add_argument("--coord-json", default=str(ROOT / "docs/demo/demo.json"))
    ap.add_argument("--hp", nargs="*", help="label.name=value hyperparameters (label = the method's label)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-mc", type=int, default=4)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--metrics", nargs="+",
                    default=["forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_tr", "forget_quality"])
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hp = parse_hp(a.hp)
    params, cfg, tok = load_model_with_tokenizer(a.model)
    rows = tofu.load_split(a.split)
    task = methods.EditTask(params, cfg, tok, a.split, rows, tofu.calibration_rows(), seed=0)
    retain_tr = cached_retain_tr(out, a.split, a.seeds, a.n_mc, limit=a.limit, batch_size=a.limit, progress=False)
    kw = dict(metrics=tuple(a.metrics), n_mc=a.n_mc, seeds=a.seeds, limit=a.limit, batch_size=a.limit,
              retain_tr=retain_tr, progress=False)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["budget"] = {"split": a.split, "seeds": a.seeds, "n_mc": a.n_mc, "limit": a.limit, "metrics": a.metrics}

    def run(name, make):
        path = out / f"eval_{name}.json"
        if path.exists():
            print(f"{name}: reusing {path}", flush=True)
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        p_params, iv, info = make()
        t1 = time.perf_counter()
        res = ev.evaluate(p_params, cfg, tok, a.split, intervene=iv, **kw)
        info = {**info, "eval_s": time.perf_counter() - t1, "prepare_wall_s": t1 - t0}
        summary.setdefault("methods", {})[name] = info
        write_json(path, res)
        write_json(summary_path, summary)
        print(name, {k: round(sum(v) / len(v), 3) for k, v in res["metrics"].items() if v and None not in v},
              f"prepare {t1 - t0:.1f}s", flush=True)
        return res

    results = {"no_edit": run("no_edit", lambda: (params, None, {}))}
    demo = json.loads(Path(a.coord_json).read_text())["coordinate"]
    coord = Coordinate(int(demo["layer"]), int(demo["step"]), module_id(demo["module"]))
    for s in a.timerome:
        alpha, q = float(s.split(",")[0]), int(s.split(",")[1])

        def make_mem(alpha=alpha, q=q):
            facts = F.load_facts(tok, a.split, tok.eos_id)
            mem, info = pl.install(params, cfg, tok, facts, coord, alpha=alpha, q=q)
            return params, Intervene(edit=mem), {"install_s": info["install_s"], "coordinate": info["coordinate"],
                                                 "alpha": alpha, "q": q, "lam": info["lam"]}

        results[f"timerome (a={alpha:g}, q={q})"] = run(f"timerome_a{alpha:g}_q{q}", make_mem)
    for entry in a.methods:
        label, _, m = entry.partition("=") if "=" in entry else (entry, "", entry)

        def make(m=m, label=label):
            hparams = dict(hp.get(label, {}))
            if m == "grace":
                hparams.setdefault("layer", coord.layer)
            prep = methods.prepare(m, task, **hparams)
            info = {k: v for k, v in prep.info.items() if k not in ("losses",)}
            if prep.params is not None and prep.params is not params:
                info["diff"] = diff_params(params, prep.params)
            return (prep.params if prep.params is not None else params), prep.intervene, info

        results[label] = run(label, make)
    table = compare(results, reference="no_edit")
    write_report(table, out, "table", reference="no_edit")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
