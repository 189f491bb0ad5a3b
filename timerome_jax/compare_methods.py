"""`timerome compare`: every method on the same split, seeds and MC masks -> the paper's Table I.

    run_compare(params, cfg, tokenizer, ["no_edit", "npo", "timerome:alpha=2,q=4"], out_dir, CompareConfig())

Each method spec is `name` or `name:key=value,key=value` (values parsed as JSON where they parse,
`a+b` as a tuple, else strings); the spec is the row label. Every method is prepared through
`methods.prepare` (registered in `baselines/registry.py`; timed, peak device memory where the
backend reports it) on the same `EditTask`: the split's forget rows, retain anchors taken ONLY from
`tofu.data.calibration_rows()` (rows no evaluation reads). Then `tofu.evaluate.evaluate` scores
the edited params and/or intervention with the same seeds, so every method sees identical MC
masks, and `tofu.report.compare` gives mean, bootstrap CI and the paired t-test vs no_edit.

Writes into out_dir: table1.md / table1.json (metrics × methods with CIs and Δ vs no_edit),
costs.md (prep wall time, peak memory, extra bytes at inference), pareto.png (−ΔForgetLP vs
ΔRetainLP with 95% CIs), compare.json (config, per-method info, full evaluation results).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from timerome_jax import methods as M
from timerome_jax import editors  # noqa: F401  (registers rome, memit, alphaedit, grace)
from timerome_jax.baselines import registry  # noqa: F401  (registers every method)
from timerome_jax.io import atomic_path, write_json, write_text
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu import evaluate as ev
from timerome_jax.tofu.report import compare, format_number, markdown_table

DEFAULT_METHODS = ("no_edit", "random_layer", "act_steer", "rmu_like", "ga", "gd", "npo", "simnpo", "adaptive_rmu",
                   "mdu", "timerome:alpha=0.5,q=2", "timerome:alpha=2,q=4", "gated")
TABLE_METRICS = ("forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_tr", "forget_quality", "model_utility")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """The evaluation protocol shared by every method.

    split, seeds, n_mc, limit (rows per evaluation set), batch_size: as `evaluate`.
    metrics: the likelihood metrics. mu: also Model Utility, from a second evaluation of
    `mu_limit` rows with `mu_gen_length`-token greedy generations (ROUGE is the costly part).
    n_retain: calibration rows given to methods as retain anchors (evenly spaced over
    calibration_rows()). prep_seed: EditTask.seed.
    The full protocol of the paper: limit None, n_mc 16, seeds 0-4, mu_limit None, mu_gen_length 128.
    """

    split: str = "forget01"
    seeds: tuple = (0, 1)
    n_mc: int = 4
    limit: Optional[int] = 40
    batch_size: int = 40
    metrics: tuple = ("forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_tr", "forget_quality")
    mu: bool = True
    mu_limit: Optional[int] = 16
    mu_gen_length: int = 64
    n_retain: int = 64
    prep_seed: int = 0

    def full_protocol(self) -> "CompareConfig":
        """The paper's protocol: every row, n_mc 16, 5 seeds, MU on every row with 128-token answers."""
        return dataclasses.replace(self, seeds=(0, 1, 2, 3, 4), n_mc=16, limit=None, mu_limit=None,
                                   mu_gen_length=128)


def _value(v: str):
    if "+" in v:
        return tuple(_value(x) for x in v.split("+"))
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_method(spec: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, hparams). Raises ValueError naming the bad part."""
    name, _, rest = spec.partition(":")
    hp = {}
    for part in filter(None, rest.split(",")):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise ValueError(f"method spec {spec!r}: {part!r} is not key=value")
        hp[k.strip()] = _value(v.strip())
    if name not in M.available():
        raise ValueError(f"method spec {spec!r}: unknown method {name!r}; available: {', '.join(M.available())}")
    return name, hp


def retain_anchor_rows(n: int) -> list[dict]:
    """n rows evenly spaced over tofu.calibration_rows() (never an evaluated row)."""
    rows = tofu.calibration_rows()
    idx = np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int)
    return [rows[i] for i in idx]


def _tree_bytes(tree) -> int:
    return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree) if hasattr(a, "shape")))


def _extra_bytes(p: M.Prepared, base) -> int:
    """Bytes a method adds at inference: the edit / adapter / changed matrices (0 for no_edit)."""
    if p.intervene is not None:
        return _tree_bytes(p.intervene)
    if p.artifact is not None:
        return _tree_bytes(p.artifact)
    if p.params is None:
        return 0
    return int(sum(np.asarray(a).nbytes for a, b in zip(jax.tree.leaves(p.params), jax.tree.leaves(base))
                   if a is not b and not np.array_equal(np.asarray(a), np.asarray(b))))


def _per_seed(res: dict) -> dict:
    return {m: {int(s): v for s, v in zip(res["seeds"], vals) if v is not None} for m, vals in res["metrics"].items()}


def pareto_plot(rows: list[dict], path, title: str = "") -> None:
    """−ΔForgetLP (x, right = more forgetting) vs ΔRetainLP (y, up = better utility), 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(r["method"], r["metric"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(7, 5))
    for m in dict.fromkeys(r["method"] for r in rows):
        f, r = cell.get((m, "forget_lp")), cell.get((m, "retain_lp"))
        if f is None or r is None:
            continue
        if m == "no_edit" or f["delta"] is None:
            x, y, xe, ye = 0.0, 0.0, None, None
        else:
            x, y = -f["delta"], r["delta"]
            xe = np.array([[x - (-f["delta_ci_hi"])], [(-f["delta_ci_lo"]) - x]]) if f["delta_ci_lo"] is not None else None
            ye = np.array([[y - r["delta_ci_lo"]], [r["delta_ci_hi"] - y]]) if r["delta_ci_lo"] is not None else None
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, label=m)
        ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("−ΔForgetLP vs no_edit (nats; right = more forgetting)")
    ax.set_ylabel("ΔRetainLP vs no_edit (nats; up = better utility)")
    ax.set_title(title or "Forget / utility trade-off")
    if ax.get_legend_handles_labels()[0]:  # a run whose methods were all skipped plots no point
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def costs_markdown(info: dict) -> str:
    """The preparation-cost table: method, prep seconds, device peak, extra bytes at inference."""
    lines = ["| method | prep wall s | peak device memory | extra bytes at inference | notes |", "|---|---|---|---|---|"]
    for m, d in info.items():
        peak = "n/a (backend reports none)" if d.get("peak_bytes") is None else f"{d['peak_bytes'] / 2**20:.1f} MiB"
        notes = []
        tr = d.get("train")
        if tr:
            notes.append(f"{tr['steps_kept']}/{tr['steps_run']} steps kept, step {format_number(tr['step_s'])} s, "
                         f"{'early stop' if tr['stopped_early'] else 'no early stop'}")
        if d.get("install"):
            notes.append(f"install {format_number(d['install']['install_s'])} s (cached across settings)")
        lines.append(f"| {m} | {format_number(d['prepare_s'])} | {peak} | {d['extra_bytes']:,} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def run_compare(params, cfg, tokenizer, method_specs: Sequence[str] = DEFAULT_METHODS, out_dir="results/compare",
                ccfg: CompareConfig = CompareConfig(), retain_tr=None, progress: bool = True,
                resume: bool = True, budget_s: Optional[float] = None) -> dict:
    """Prepare and evaluate every method; write the files listed in the module docstring.

    retain_tr: the retain model's forget TRs for Forget Quality (see `evaluate`; None = no FQ).
    resume: reuse the methods already in <out_dir>/compare.json when it was written with the same
    evaluation protocol (split, seeds, n_mc, limit, batch size, metrics, MU settings, anchors).
    budget_s: start no method (after the first one this call runs) when the time so far plus 1.2x
    the slowest method so far would pass it; the methods left are listed under "skipped" in the
    result (a rerun with resume continues).
    Returns {"rows": compare rows, "info": {method: costs}, "files": {...}}."""
    specs = list(dict.fromkeys(method_specs))
    if "no_edit" not in specs:
        specs.insert(0, "no_edit")
    parsed = {s: parse_method(s) for s in specs}  # fail before any work on a bad spec
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = M.EditTask(params=params, cfg=cfg, tokenizer=tokenizer, split=ccfg.split,
                      forget_rows=tofu.load_split(ccfg.split), retain_rows=retain_anchor_rows(ccfg.n_retain),
                      seed=ccfg.prep_seed)
    results, full, info = {}, {}, {}
    old = _resumable(out, ccfg) if resume else {}
    t_all = time.perf_counter()
    slowest, skipped, rows = 0.0, [], None
    for spec in specs:
        name, hp = parsed[spec]
        if spec in old.get("done", []):
            full[spec], info[spec] = old["results"][spec], old["info"][spec]
            results[spec] = _per_seed(full[spec]["main"])
            if "mu" in full[spec]:
                results[spec].update(_per_seed(full[spec]["mu"]))
            continue
        if budget_s is not None and slowest > 0 and time.perf_counter() - t_all + 1.2 * slowest > budget_s:
            skipped.append(spec)
            continue
        t_method = time.perf_counter()
        if progress:
            print(f"[compare] {spec}: prepare", flush=True)
        prep = M.prepare(name, task, **hp)
        p_eval = prep.params if prep.params is not None else params
        t0 = time.perf_counter()
        res = ev.evaluate(p_eval, cfg, tokenizer, ccfg.split, metrics=ccfg.metrics, n_mc=ccfg.n_mc, seeds=ccfg.seeds,
                          intervene=prep.intervene, retain_tr=retain_tr, batch_size=ccfg.batch_size,
                          limit=ccfg.limit, progress=progress)
        per = _per_seed(res)
        full[spec] = {"main": res}
        if ccfg.mu:
            res_mu = ev.evaluate(p_eval, cfg, tokenizer, ccfg.split, metrics=("model_utility",), n_mc=ccfg.n_mc,
                                 seeds=ccfg.seeds, intervene=prep.intervene, batch_size=ccfg.batch_size,
                                 limit=ccfg.mu_limit, gen_length=ccfg.mu_gen_length, progress=progress)
            per.update(_per_seed(res_mu))
            full[spec]["mu"] = res_mu
        results[spec] = per
        info[spec] = {"method": name, "hparams": hp, "prepare_s": prep.info["prepare_s"],
                      "peak_bytes": prep.info["peak_bytes"], "extra_bytes": _extra_bytes(prep, params),
                      "eval_s": time.perf_counter() - t0,
                      **{k: v for k, v in prep.info.items() if k in ("train", "install", "layer")}}
        if progress:
            fl = per.get("forget_lp", {})
            print(f"[compare] {spec}: prep {prep.info['prepare_s']:.1f}s eval {info[spec]['eval_s']:.1f}s "
                  f"forget_lp {np.mean(list(fl.values())) if fl else float('nan'):.2f}", flush=True)
        del prep, p_eval
        rows = _write(out, specs, results, info, full, ccfg, time.perf_counter() - t_all)  # after every method
        slowest = max(slowest, time.perf_counter() - t_method)
    if rows is None:  # everything came from the resumed file or was skipped
        rows = _write(out, specs, results, info, full, ccfg, time.perf_counter() - t_all)
    if skipped:
        print(f"[compare] budget {budget_s:.0f} s reached; not run: {', '.join(skipped)} (rerun to resume)", flush=True)
    return {"rows": rows, "info": info, "files": _files(out), "total_s": time.perf_counter() - t_all,
            "skipped": skipped}


_PROTOCOL = ("split", "seeds", "n_mc", "limit", "batch_size", "metrics", "n_retain", "prep_seed")
_MU_PROTOCOL = ("mu_limit", "mu_gen_length")


def _resumable(out: Path, ccfg: CompareConfig) -> dict:
    """The previous compare.json in `out` if it used the same protocol, else {}."""
    path = out / "compare.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    now = json.loads(json.dumps(dataclasses.asdict(ccfg)))
    oc = old.get("config", {})
    if "done" not in old or any(oc.get(k) != now[k] for k in _PROTOCOL):
        return {}
    mu_ok = oc.get("mu") and all(oc.get(k) == now[k] for k in _MU_PROTOCOL)
    if ccfg.mu and not mu_ok:
        return {}
    if not ccfg.mu:  # the likelihood part is reusable; its MU part (if any) is not what was asked
        for r in old["results"].values():
            r.pop("mu", None)
    return old


def _files(out: Path) -> dict:
    return {"table_md": str(out / "table1.md"), "table_json": str(out / "table1.json"),
            "costs_md": str(out / "costs.md"), "pareto_png": str(out / "pareto.png"),
            "compare_json": str(out / "compare.json")}


def _write(out: Path, specs, results, info, full, ccfg: CompareConfig, total_s: float) -> list[dict]:
    """(Re)write every output file from the methods done so far; return the compare rows."""
    rows = compare(results, reference="no_edit")
    order = {m: i for i, m in enumerate(TABLE_METRICS)}
    rows.sort(key=lambda r: (specs.index(r["method"]), order.get(r["metric"], 99)))
    done = [s for s in specs if s in results]
    title = (f"TOFU {ccfg.split}: {len(ccfg.seeds)} seeds, n_mc {ccfg.n_mc}, limit {ccfg.limit}, "
             f"MU on {ccfg.mu_limit} rows / {ccfg.mu_gen_length} tokens" if ccfg.mu else
             f"TOFU {ccfg.split}: {len(ccfg.seeds)} seeds, n_mc {ccfg.n_mc}, limit {ccfg.limit}, no MU")
    pending = [s for s in specs if s not in results]
    md = (f"# Table I — {title}\n\n" + (f"Pending: {', '.join(pending)}\n\n" if pending else "") +
          markdown_table(rows, "no_edit") + "\n## Preparation cost\n\n" + costs_markdown(info) +
          f"\nTotal wall time {total_s:.0f} s for {len(done)} methods.\n")
    files = _files(out)
    write_text(files["table_md"], md)
    write_json(files["table_json"], rows)
    write_text(files["costs_md"], costs_markdown(info))
    pareto_plot(rows, files["pareto_png"], title)
    write_json(files["compare_json"], {"config": dataclasses.asdict(ccfg), "methods": specs, "done": done,
                                       "info": info, "total_s": total_s, "results": full})
    return rows
