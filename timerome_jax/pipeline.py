"""The TimeROME-DLM pipeline (Algorithm 1) on TOFU: trace -> select -> install -> evaluate.

Python API (the CLI in `cli.py` is a thin layer over these):

    trace_facts(params, cfg, facts, tcfg)            Stage 1, TIE heatmaps for a list of facts
    trace.select(result.tie_bar, ...)                Stage 2, Eq. 5
    install(params, cfg, tok, facts, coord, ...)     Stage 3, capture + ridge solve -> EditMemory
    capture_and_build(params, cfg, batch, coord, ...) Stage 3 on a ClozeBatch, without a gate
    evaluate_methods(...)                            no_edit vs edit memories, TOFU metrics,
                                                     bootstrap CIs and paired tests
    demo(...)                                        all of it, writing results/
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from timerome_jax.tofu import evaluate as ev
from timerome_jax.tofu.reference import cached_retain_tr
from timerome_jax.tofu.report import compare, write_report
from timerome_jax.method import facts as F
from timerome_jax.method import capture as cap_lib
from timerome_jax.method import gate as gate_lib
from timerome_jax.method import memory as mem_lib
from timerome_jax.method import memory_file
from timerome_jax.method import trace as tr
from timerome_jax.backbone.config import MODULES
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.io import atomic_path, write_json
from timerome_jax.backbone.tokenizer import eos_or_default

DEFAULT_TARGET = cap_lib.DEFAULT_TARGET_TEXT


def _bar(total, desc, progress):
    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def trace_facts(params, cfg, facts: Sequence[F.Fact], tcfg: tr.TraceConfig = tr.TraceConfig(), batch: int = 8,
                progress: bool = True) -> tr.TraceResult:
    """Stage 1: TIE for every fact (facts need a subject span; batches of `batch` facts)."""
    no_subj = [f.index for f in facts if f.key_source != "subject"]
    if no_subj:
        raise ValueError(f"trace_facts: facts {no_subj} have no subject span in their question")
    if not facts:
        raise ValueError("trace_facts: empty fact list")
    parts = []
    with _bar(len(facts) * tcfg.n_noise, "trace (facts x noise draws)", progress) as bar:
        for i in range(0, len(facts), batch):
            chunk = list(facts[i:i + batch])
            fb = F.fact_batch(chunk, cfg)
            parts.append(tr.trace(params, cfg, fb, tcfg, progress=lambda *_: bar.update(len(chunk))))
    return tr.TraceResult(*(np.concatenate([getattr(p, k) for p in parts], axis=1 if k == "corrupted" else 0)
                            for k in tr.TraceResult._fields))


def save_trace(result: tr.TraceResult, coord: tr.Coordinate, facts, tcfg, out_dir, title="") -> dict:
    """Write tie.npz (raw arrays), heatmap.png (mean TIE_bar, one panel per module); return paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "tie.npz"
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, tie=result.tie, tie_bar=result.tie_bar, clean=result.clean, corrupted=result.corrupted,
                     fact_index=np.array([f.index for f in facts]), coordinate=np.array(coord),
                     steps=tcfg.steps, tau=tcfg.tau, noise_scale=tcfg.noise_scale, n_noise=tcfg.n_noise)
    png = out / "heatmap.png"
    tr.plot_heatmaps(np.nanmean(result.tie_bar, 0), str(png), title)
    return {"npz": str(npz), "png": str(png)}


default_lam = mem_lib.default_lam


def capture_and_build(params, cfg, batch: cap_lib.ClozeBatch, coord: tr.Coordinate, alpha: float, q: int,
                      lam: Optional[float] = None, capacity: Optional[int] = None, chunk: int = 16):
    """Eqs. 6-11 without a gate for a `ClozeBatch` of N facts -> (EditMemory, (u, v_o, v_t), info).

    Up to `memory.DEVICE_SOLVE_MAX` facts the float64 solve runs on the device, queued right
    behind the capture (`memory.build_on_device`), and the keys are read back and checked while it
    runs; more facts are solved on the host (`memory.build`). Returns once the memory is on the
    device. u, v_o, v_t [N,D] float32 NumPy; info: capture_s (on the device path: until the keys
    are back, the solve queued), solve_s (the rest), lam, solved_on ("device" or "host")."""
    t0 = time.perf_counter()
    small = batch.n <= mem_lib.DEVICE_SOLVE_MAX
    if small:
        uvv, empty = cap_lib.capture_on_device(params, cfg, batch, coord.layer, coord.module, chunk=chunk)
        fingerprint = cap_lib.model_fingerprint(params, cfg)  # looked up while the capture runs
        memory = mem_lib.build_on_device(uvv, lam=lam, alpha=alpha, q=q, layer=coord.layer, module=coord.module,
                                         step=coord.step, capacity=capacity, fingerprint=fingerprint)
        u, v_o, v_t = cap_lib.finish_capture(uvv, empty)  # raises on facts without valid positions
    else:
        u, v_o, v_t = cap_lib.capture(params, cfg, batch, coord.layer, coord.module, chunk=chunk)
    t1 = time.perf_counter()
    lam = default_lam(u) if lam is None else float(lam)
    if not small:
        memory = mem_lib.build(u, v_o, v_t, lam=lam, alpha=alpha, q=q, layer=coord.layer, module=coord.module,
                               step=coord.step, capacity=capacity,
                               fingerprint=cap_lib.model_fingerprint(params, cfg))
    jax.block_until_ready(memory.G)
    info = {"capture_s": t1 - t0, "solve_s": time.perf_counter() - t1, "lam": lam,
            "solved_on": "device" if small else "host"}
    return memory, (u, v_o, v_t), info


def install(params, cfg, tokenizer, facts: Sequence[F.Fact], coord: tr.Coordinate, alpha: float, q: int,
            lam: Optional[float] = None, target_text: str = DEFAULT_TARGET, capacity: Optional[int] = None,
            chunk: int = 16, gate: bool = False, calibration: Optional[gate_lib.GateCalibration] = None,
            percentile: Optional[float] = gate_lib.DEFAULT_PERCENTILE, latch: bool = True):
    """Stage 3: capture (Eqs. 6-9) and solve (Eq. 11) -> (EditMemory, info).

    lam None = `default_lam` of the captured keys. target_text: one string, or one per fact (e.g.
    TOFU idontknow lines). gate: also capture slot keys and build the gated memory
    (`memory.Gate`), whitened and thresholded (token gate at `percentile` of held-out retain tokens,
    None = no token gate: `Gate.token` False, tau stored as `gate.TAU_OFF`) with
    `calibration` (None: `gate.calibrate` on TOFU calibration rows at this coordinate); latch: also
    set the sequence latch's threshold (`memory.calibrate_tau_seq`; False: tau_seq = +inf, the
    token gate alone).
    Without a gate: `capture_and_build` (up to `memory.DEVICE_SOLVE_MAX` facts the solve runs on
    the device behind the capture). info: capture_s, solve_s, install_s, n_facts, lam, solved_on,
    coordinate (+ gate_s, tau, tau_seq (None: no latch), percentile, calibration_rows when gated)."""
    if not facts:
        raise ValueError("install: the forget set is empty")
    if lam is not None and not lam > 0:
        raise ValueError(f"install: lambda must be > 0, got {lam}")
    t0 = time.perf_counter()
    cb = F.cloze_batch(facts, tokenizer, cfg, target_text)
    coordinate = {"layer": coord.layer, "step": coord.step, "module": MODULES[coord.module]}
    if not gate:
        memory, _, built = capture_and_build(params, cfg, cb, coord, alpha, q, lam=lam, capacity=capacity,
                                             chunk=chunk)
        info = {"capture_s": built["capture_s"], "solve_s": built["solve_s"],
                "install_s": time.perf_counter() - t0, "n_facts": len(facts), "lam": built["lam"],
                "alpha": alpha, "q": q, "gated": False, "solved_on": built["solved_on"], "coordinate": coordinate}
        return memory, info
    if percentile is None and not latch:
        raise ValueError("install: percentile=None (token gate off) needs latch=True, or nothing is edited")
    u, v_o, v_t = cap_lib.capture(params, cfg, cb, coord.layer, coord.module, chunk=chunk)  # on the host
    t1 = time.perf_counter()
    lam = default_lam(u) if lam is None else float(lam)
    if calibration is None:
        calibration = gate_lib.calibrate(params, cfg, tokenizer, coord.layer, coord.module)
    elif (calibration.layer, calibration.module) != (coord.layer, coord.module):
        raise ValueError(f"install: the gate calibration is at (layer, module) "
                         f"({calibration.layer}, {calibration.module}), the edit at ({coord.layer}, {coord.module})")
    if latch and calibration.h_probe is None:
        raise ValueError("install: latch=True needs a calibration with probe residuals (gate.calibrate)")
    keys = np.asarray(cap_lib.capture_slot_keys(params, cfg, cb, coord.layer, coord.module, chunk=chunk))
    n_slots = np.asarray(cb.obj_valid).sum(1).astype(np.int32)
    t2 = time.perf_counter()
    memory = mem_lib.build(u, v_o, v_t, lam=lam, alpha=alpha, q=q, layer=coord.layer, module=coord.module,
                           step=coord.step, capacity=capacity, fingerprint=cap_lib.model_fingerprint(params, cfg),
                           gate_keys=keys, whitening=calibration.whitening, gate_n_slots=n_slots)
    tau = gate_lib.TAU_OFF if percentile is None else mem_lib.calibrate_tau(memory, calibration.h_thresh, percentile)
    tau_seq = mem_lib.calibrate_tau_seq(memory, calibration.h_probe, calibration.probe_slots) if latch else float("inf")
    # percentile None: no per-token gate at all (structure), so a step does only the latch's select
    memory = mem_lib.with_gate(memory, tau=tau, tau_seq=tau_seq, token=percentile is not None)
    jax.block_until_ready(memory.G)
    t3 = time.perf_counter()
    info = {"capture_s": t1 - t0, "solve_s": t3 - t2, "install_s": t3 - t0, "n_facts": len(facts), "lam": lam,
            "alpha": alpha, "q": q, "gated": True, "solved_on": "host", "gate_s": t2 - t1, "tau": tau,
            "tau_seq": tau_seq if np.isfinite(tau_seq) else None, "percentile": percentile,
            "calibration_rows": {"whiten": len(calibration.whiten_rows), "thresh": len(calibration.thresh_rows)},
            "coordinate": coordinate}
    return memory, info


def with_hparams(memory: mem_lib.EditMemory, alpha: float, q: int) -> mem_lib.EditMemory:
    """The same memory at another (alpha, q): data only, so it reuses compiled programs."""
    return dataclasses.replace(memory, alpha=np.float32(alpha), q=np.int32(q))


def evaluate_methods(params, cfg, tokenizer, methods: dict, split: str, retain_tr, out_dir, name: str,
                     **eval_kw) -> tuple[list, dict]:
    """Evaluate {method: Intervene or None} with `evaluate.evaluate` on the same seeds and masks,
    then `compare` (bootstrap CIs, paired t vs no_edit) and write <out_dir>/<name>.{json,md}."""
    results = {}
    for m, iv in methods.items():
        results[m] = ev.evaluate(params, cfg, tokenizer, split, intervene=iv, retain_tr=retain_tr, **eval_kw)
    rows = compare(results, reference="no_edit")
    write_report(rows, out_dir, name, reference="no_edit")
    write_json(Path(out_dir) / f"{name}_full.json", results)
    return rows, results


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What `timerome demo` does (defaults sized to finish in minutes on a 2-core CPU)."""

    split: str = "forget01"
    n_trace: int = 8
    trace: tr.TraceConfig = tr.TraceConfig()
    # (name, alpha, q, gated): the gated memory and the paper's Eq. 12 at the same (alpha, q)
    settings: tuple = (("gated", 4.0, 4, True), ("paper_eq12", 4.0, 4, False))
    gate_percentile: Optional[float] = gate_lib.DEFAULT_PERCENTILE
    gate_rows: tuple = (400, 400)  # calibration rows for the gate's whitening and threshold
    lam: Optional[float] = None
    target_text: str = DEFAULT_TARGET
    metrics: tuple = ("forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_tr", "forget_quality")
    seeds: tuple = (0, 1, 2)
    n_mc: int = 4
    limit: Optional[int] = 40
    batch_size: int = 40


def demo(params, cfg, tokenizer, out_dir, dcfg: DemoConfig = DemoConfig(), retain_model=None,
         progress: bool = True, reference_override: bool = False) -> dict:
    """The main job: trace `n_trace` facts of the forget split, select the coordinate (Eq. 5, resid,
    k* = -1), build the (gated) memory for every fact of the split, evaluate no_edit vs each (alpha, q,
    gated) setting (by default the gated memory beside the paper's Eq. 12),
    and write heatmap.png, tie.npz, table.{md,json}, memory.npz and demo.json into `out_dir`.
    retain_model: the Forget Quality reference: "auto" = the packaged model trained on the split's
    retain set (`tofu.models.retain_model_for`; FQ is None if there is none), a folder (checked
    against the split: a mismatch raises ReferenceMismatchError unless `reference_override`), or
    None (FQ is not computed). demo.json's "reference" records which one was used."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    eos = eos_or_default(tokenizer, cfg)
    all_facts = F.load_facts(tokenizer, dcfg.split, eos)
    traced = [f for f in all_facts if f.key_source == "subject"][: dcfg.n_trace]
    t0 = time.perf_counter()
    result = trace_facts(params, cfg, traced, dcfg.trace, batch=dcfg.n_trace, progress=progress)
    coord, score = tr.select(result.tie_bar)
    t_trace = time.perf_counter() - t0
    paths = save_trace(result, coord, traced, dcfg.trace, out,
                       f"TIE_bar over {len(traced)} {dcfg.split} facts (K={dcfg.trace.steps})")
    gated = any(s[3] for s in dcfg.settings)
    t0 = time.perf_counter()
    calib = gate_lib.calibrate(params, cfg, tokenizer, coord.layer, coord.module, *dcfg.gate_rows) if gated else None
    t_calib = time.perf_counter() - t0
    memory, info = install(params, cfg, tokenizer, all_facts, coord, alpha=dcfg.settings[0][1], q=dcfg.settings[0][2],
                           lam=dcfg.lam, target_text=dcfg.target_text, gate=gated, calibration=calib,
                           percentile=dcfg.gate_percentile)
    memory_file.save(memory, out / "memory.npz", {"split": dcfg.split, "target_text": dcfg.target_text,
                                              "fact_index": [f.index for f in all_facts]})
    retain_tr = None
    reference = {"model": None, "reference_override": False, "message": "no reference model given"}
    if "forget_quality" in ev.expand_metrics(dcfg.metrics) and retain_model is not None:
        retain_tr = cached_retain_tr(out, dcfg.split, dcfg.seeds, dcfg.n_mc, retain_model=str(retain_model),
                                     limit=dcfg.limit, batch_size=dcfg.batch_size, progress=progress,
                                     override=reference_override, record=reference)
    methods = {"no_edit": None}
    for name, alpha, q, g in dcfg.settings:
        m = with_hparams(memory, alpha, q)
        m = mem_lib.with_gate(m, on=g) if m.gate is not None else m
        methods[f"{name} (a={alpha:g}, q={q})"] = Intervene(edit=m)
    t0 = time.perf_counter()
    rows, _ = evaluate_methods(params, cfg, tokenizer, methods, dcfg.split, retain_tr, out, "table",
                               metrics=dcfg.metrics, n_mc=dcfg.n_mc, seeds=dcfg.seeds, limit=dcfg.limit,
                               batch_size=dcfg.batch_size, progress=progress)
    summary = {"coordinate": info["coordinate"], "install": info, "trace_s": t_trace, "gate_calibration_s": t_calib,
               "eval_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t_start,
               "traced_facts": [f.index for f in traced], "n_facts": len(all_facts),
               "clean_final_logp": result.clean[:, -1].tolist(),
               "corrupted_final_logp": result.corrupted[:, :, -1].mean(0).tolist(),
               "max_mean_abs_tie": float(score.max()), "reference": reference,
               "reference_override": bool(reference.get("reference_override")), "files": {**paths, "table": str(out / "table.md"),
                                                                  "memory": str(out / "memory.npz")},
               "config": json.loads(json.dumps(dataclasses.asdict(dcfg), default=str))}
    write_json(out / "demo.json", summary)
    return {"summary": summary, "rows": rows}


def print_rows(rows, metrics=("forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_tr", "forget_quality")):
    """Short console table: mean [CI] and Δ vs no_edit."""
    lines = []
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for k in metrics:
            r = next((r for r in rows if r["method"] == m and r["metric"] == k), None)
            if r is None:
                continue
            if r["mean"] is None:  # a p-value (forget_quality): pooled over seeds, never a mean
                pooled = "–" if r.get("pooled") is None else f"{r['pooled']:.3g}"
                cells.append(f"{k}(pooled)={pooled}")
                continue
            d = f" Δ{r['delta']:+.2f}{r['sig']}" if r["delta"] is not None else ""
            cells.append(f"{k}={r['mean']:.3g}{d}")
        lines.append(f"{m:32s} " + "  ".join(cells))
    text = "\n".join(lines)
    print(text)
    return text


__all__ = ["trace_facts", "save_trace", "install", "with_hparams", "evaluate_methods", "DemoConfig", "demo",
           "default_lam", "capture_and_build", "print_rows"]
