"""Markdown summary of the benchmark JSONs in a folder (written by run_all after every figure).

    python benchmarks/summarize.py benchmarks/results          # writes benchmarks/results/summary.md

States the card (JAX device kind, torch device name, driver), the JAX / jaxlib / torch /
transformers versions, and per figure: FLOPs, floor (from the ceilings measured in the same run),
compile time and steady-state time apart (with the number of timed runs), ratio to the floor, the
torch/JAX ratio, peak memory and whether each benchmark target was met. Missing or failed figures
are listed as such.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIGS = (("ceiling", "ceiling.json"), ("a", "fig_a_tie.json"), ("b", "fig_b_install.json"),
        ("c", "fig_c_generate.json"), ("d", "fig_d_memory.json"), ("stages", "tie_stages.json"),
        ("scaling", "tie_scaling.json"), ("screen", "tie_screen.json"), ("validate", "validate_8b.json"))


def _loop(unroll: int, n_layers: int) -> str:
    if unroll >= n_layers:
        return "unrolled (`layer_unroll` %d: static layer indices)" % unroll
    return "`lax.scan`" + ("" if unroll == 1 else " (unroll %d)" % unroll)


def _load(folder):
    out = {}
    for key, name in FIGS:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            try:
                with open(p) as f:
                    out[key] = json.load(f)
            except (OSError, ValueError) as e:
                out[key] = {"status": f"unreadable ({e})", "errors": {}}
    return out


def s(x, nd=3):
    """Seconds."""
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if x < 1:
        return f"{x * 1e3:.{max(nd - 1, 0)}g} ms"
    return f"{x:.{nd}g} s"


def r(x, nd=3):
    return "-" if x is None else f"{x:.{nd}g}"


def gb(x):
    return "-" if x is None else f"{x / 2 ** 30:.2f} GiB"


def mb(x):
    return "-" if x is None else f"{x / 2 ** 20:.2f} MiB"


def fl(x):
    if x is None:
        return "-"
    for unit, k in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= k:
            return f"{x / k:.3g} {unit}"
    return f"{x:.3g} FLOP"


def yes(x):
    return "-" if x is None else ("met" if x else "**missed**")


def n_of(m):
    if not m:
        return "-"
    n = m.get("n_steady", 0)
    est = " (est. from compile run)" if m.get("steady_estimated_from_compile_run") else ""
    return f"{n}/{m.get('want')}{est}"


def _env_lines(figs):
    env = next((f["env"] for f in figs.values() if isinstance(f, dict) and "env" in f), None)
    if env is None:
        return ["No results yet."]
    lines = [f"- Card: **{env.get('torch_device_name') or env.get('jax_device_kind')}** (JAX device_kind "
             f"`{env.get('jax_device_kind')}`, {env.get('n_local_devices')} local device(s)"
             + (f"; nvidia-smi: {'; '.join(env['nvidia_smi'])}" if env.get("nvidia_smi") else "") + ")",
             f"- JAX {env.get('jax_version')} (jaxlib {env.get('jaxlib_version')}), torch {env.get('torch_version')} "
             f"(CUDA {env.get('torch_cuda')}, cuDNN {env.get('torch_cudnn')}), transformers "
             f"{env.get('transformers_version')}, Python {env.get('python')}, run at {env.get('time_utc')}"]
    any_fig = next((f for k, f in figs.items() if k != "ceiling" and "shapes" in f), None)
    tw = next((f["torch_weights"] for f in figs.values() if isinstance(f, dict) and "torch_weights" in f), None)
    if any_fig:
        c = any_fig["shapes"]["config"]
        lines.append(f"- Model: {c['n_layers']} layers, d {c['d_model']}, {c['n_heads']} heads, FFN {c['d_ff']}, "
                     f"vocab {c['vocab_size']}, {c['dtype']}, JAX attention "
                     f"`{any_fig.get('attn_impl_used', c['attn_impl'])}`, layer loop "
                     f"{_loop(c.get('layer_unroll', 1), c['n_layers'])}, torch SDPA under no_grad; random weights "
                     "made on the device by JAX"
                     + (f", the same weights in torch ({tw['transfer']}; torch's peak memory counts its own "
                        "allocations only)" if tw else ""))
    fails = {k: f["cudnn_error"] for k, f in figs.items() if isinstance(f, dict) and f.get("cudnn_error")}
    for k, e in fails.items():
        lines.append(f"- Figure {k}: cuDNN attention failed, measured with XLA attention instead: `{e[:200]}`")
    return lines


def _status(fig):
    st = fig.get("status")
    errs = fig.get("errors") or {}
    out = [] if st == "ok" else [f"_status: {st}_"]
    for k, e in errs.items():
        out.append(f"- error in `{k}`: `{str(e.get('error', ''))[:300]}`")
    return out


def write_summary(folder: str) -> str:
    figs = _load(folder)
    L = ["# Benchmarks (LLaDA-8B shape): JAX vs PyTorch hooks", ""] + _env_lines(figs) + [""]
    ceil = figs.get("ceiling", {})
    if ceil:
        j, t = ceil.get("jax", {}), ceil.get("torch", {})
        L += ["## Ceilings (same run)", "", "| | bf16 matmul | read | copy (read+write) |", "|---|---|---|---|",
              f"| JAX (matmul and read used for floors) | {r((j.get('matmul_flops_per_s') or 0) / 1e12)} TFLOP/s "
              f"(n={j.get('n')}) | {r((j.get('read_bytes_per_s') or 0) / 1e12)} TB/s | "
              f"{r((j.get('copy_bytes_per_s') or 0) / 1e12)} TB/s |",
              f"| torch | {r(t['matmul_flops_per_s'] / 1e12) if t else '-'} TFLOP/s | - | "
              f"{r(t['copy_bytes_per_s'] / 1e12) if t else '-'} TB/s |", ""] + _status(ceil) + [""]

    a = figs.get("a")
    if a:
        sh, j, t = a.get("shapes", {}), a.get("jax", {}), a.get("torch", {})
        flr = a.get("floor", {})
        c_ = sh.get("config", {})
        L += [f"## a. Full TIE sweep ({sh.get('facts')} facts, {c_.get('n_layers')} layers x {sh.get('steps')} steps "
              "x 3 modules, prefix steps shared)", "",
              f"{sh.get('facts')} facts x {sh.get('seq_len')} tokens, K = {sh.get('steps')}, n_noise = "
              f"{sh.get('n_noise')}, {sh.get('rows_per_forward')} rows per forward; "
              f"{a.get('work', {}).get('rows')} sequence-forwards = {fl(flr.get('flops'))}; "
              f"floor {s(flr.get('floor_s'))} ({flr.get('bound')}-bound).", "",
              "| | compile | steady (runs) | / floor | peak memory |", "|---|---|---|---|---|",
              f"| JAX `trace.trace` (lanes) | {s(j.get('compile', {}).get('compile_s'))} | {s(j.get('steady_s'))} "
              f"({n_of(j)}) | {r(j.get('ratio_to_floor'))} | {gb(j.get('peak_bytes'))} |",
              f"| torch hooks (`torch_trace`) | - | {s(t.get('steady_s'))} ({n_of(t)}) | {r(t.get('ratio_to_floor'))} "
              f"| {gb(t.get('peak_bytes'))} (torch allocator) |", "",
              f"torch / JAX = **{r(a.get('torch_over_jax'))}** (target > 1: {yes(a.get('met', {}).get('faster_than_torch'))}); "
              f"JAX / floor target <= 1.5: {yes(a.get('met', {}).get('jax_within_1.5x_floor'))}."]
        ag = a.get("agreement")
        if ag:
            L.append(f"Agreement (same weights and noise): TIE_bar max |diff| {r(ag['tie_bar'].get('max_abs_diff'))} "
                     f"(max |TIE_bar| {r(ag['tie_bar'].get('max_abs_ref'))}, rel {r(ag['tie_bar'].get('rel_err'))}); "
                     f"clean scores rel {r(ag['clean'].get('rel_err'))}.")
        L += [""] + _status(a) + [""]

    b = figs.get("b")
    if b:
        L += ["## b. Edit install (capture + solve), layer "
              f"{b.get('shapes', {}).get('layer')} {b.get('shapes', {}).get('module')}", "",
              f"Cloze sequences of {b.get('shapes', {}).get('seq_len_object_cloze')} tokens, "
              f"{b.get('shapes', {}).get('chunk')} facts per forward; JAX fingerprint: read from the weights "
              f"{s(b.get('fingerprint_s'))} once per loaded model (apart), cached lookup "
              f"{s(b.get('fingerprint_cached_s'))} (in JAX install).", "",
              "| F | FLOPs | floor | JAX capture (runs) | JAX host solve | JAX install (whole) | target | / floor | "
              "torch capture | torch solve | torch install | torch/JAX | JAX compile |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, row in b.get("sizes", {}).items():
            j, t = row.get("jax", {}), row.get("torch", {})
            met = b.get("met", {}).get(n, {})
            L.append(f"| {n} | {fl(row['floor']['flops'])} | {s(row['floor']['floor_s'])} | "
                     f"{s(j.get('capture', {}).get('steady_s'))} ({n_of(j.get('capture'))}) | "
                     f"{s(j.get('solve', {}).get('steady_s'))} | {s(j.get('install_s'))} | "
                     f"<= {s(row.get('target_install_s'))}: {yes(met.get('within_target_s'))} | "
                     f"{r(j.get('ratio_to_floor'))} ({'<=2: ' + yes(met.get('within_2x_floor'))}) | "
                     f"{s(t.get('capture', {}).get('steady_s'))} | {s(t.get('solve', {}).get('steady_s'))} | "
                     f"{s(t.get('install_s'))} | {r((row.get('torch_over_jax') or {}).get('install'))} | "
                     f"{s(j.get('capture_compile_s'))} |")
        for n, row in b.get("sizes", {}).items():
            u = row.get("jax_unstacked")
            if u:
                L += ["", f"Unstacked layout (`model.unstack`) at |F| = {n}: install (the library's, timed whole; "
                      f"solve on the {u.get('solved_on')}) {s(u.get('install_s'))} = {r(u.get('ratio_to_floor'))}x floor "
                      f"(<= 2: {yes(b.get('met', {}).get(n, {}).get('unstacked_within_2x_floor'))}); parts: capture "
                      f"{s(u.get('capture', {}).get('steady_s'))} + host solve {s(u.get('solve', {}).get('steady_s'))} "
                      f"= {s(u.get('install_s_parts'))} = {r(u.get('ratio_to_floor_parts'))}x floor; "
                      f"keys equal to the stacked layout's: {u.get('u_equal_to_stacked')}."]
        gate_rows = [(n, row["jax"]["gate"]) for n, row in b.get("sizes", {}).items() if "gate" in row.get("jax", {})]
        if gate_rows:
            L += ["", "Gated install, the latch default as `pipeline.install` builds it with a given calibration "
                  "(capture + slot-key capture + gated build + tau_seq on "
                  f"{gate_rows[0][1].get('probe_rows')} probe rows); the calibration itself (`gate.calibrate`: residual "
                  f"captures + whitening fit, once per model and coordinate) took {s(b.get('gate_calibration_s'))}:", "",
                  "| F | slot keys | gated build + tau_seq | gated install | target | + calibration | target |",
                  "|---|---|---|---|---|---|---|"]
            for n, g in gate_rows:
                met = b.get("met", {}).get(n, {})
                tgt = b["sizes"][n].get("target_install_s")
                L.append(f"| {n} | {s(g.get('slot_keys', {}).get('steady_s'))} | "
                         f"{s(g.get('solve_with_gate', {}).get('steady_s'))} | {s(g.get('install_s'))} | "
                         f"<= {s(tgt)}: {yes(met.get('gated_within_target_s'))} | "
                         f"{s(g.get('install_s_with_calibration'))} | "
                         f"<= {s(tgt)}: {yes(met.get('gated_with_calibration_within_target_s'))} |")
        L += [""] + _status(b) + [""]

    c = figs.get("c")
    if c:
        sh = c.get("shapes", {})
        e = sh.get("edit", {})
        L += [f"## c. Generation: prompt {sh.get('prompt_len')} + {sh.get('gen_len')} new tokens, {sh.get('steps')} "
              f"steps, edit |F| = {e.get('facts')}, q = {e.get('q')} at layer {e.get('layer')} {e.get('module')}", "",
              f"JAX rows: the {c.get('jax_layout', 'stacked')} layer layout. Edit overhead: from the medians, and "
              "[median of the per-round ratios] (runs interleaved no edit / edit / gated; JAX rounds "
              f"{(sh.get('rounds') or {}).get('batch_1', '?')} at batch 1, "
              f"{(sh.get('rounds') or {}).get('other_batches', '?')} above"
              + (f", each round in a seeded random order, {1e3 * kn['idle_gap_s']:.0f} ms idle before each call"
                 if (kn := c.get("knobs") or {}).get("idle_gap_s") else "") + ").",
              "",
              "| batch | floor | JAX step no edit / edit | / floor | edit overhead | torch step no edit / edit | torch overhead | "
              "JAX tok/s (edit) | torch tok/s (edit) | JAX/torch throughput | JAX compile | runs (JAX, torch) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for bsz, row in c.get("batches", {}).items():
            j, t = row.get("jax", {}), row.get("torch", {})
            jn, je, tn, te = j.get("no_edit", {}), j.get("edit", {}), t.get("no_edit", {}), t.get("edit", {})
            thr = row.get("jax_over_torch_throughput", {})
            L.append(f"| {bsz} | {s(row['floor']['floor_s'])} ({row['floor']['bound']}) | "
                     f"{r(jn.get('step_ms'))} / {r(je.get('step_ms'))} ms | {r(jn.get('ratio_to_floor'))} | "
                     f"{r(j.get('edit_overhead_pct'), 2)}% "
                     f"[{r(j.get('edit_overhead_pct_paired_median'), 2)}%] | "
                     f"{r(tn.get('step_ms'))} / {r(te.get('step_ms'))} ms | {r(t.get('edit_overhead_pct'), 2)}% "
                     f"[{r(t.get('edit_overhead_pct_paired_median'), 2)}%] | "
                     f"{r(je.get('new_tokens_per_s'))} | {r(te.get('new_tokens_per_s'))} | "
                     f"{r(thr.get('no_edit'))} / {r(thr.get('edit'))} | {s(jn.get('compile_s'))} | "
                     f"{n_of(jn)}, {n_of(tn)} |")
        L.append("")
        for bsz, row in c.get("batches", {}).items():
            kp = row.get("jax", {}).get("kernel_profile")
            if kp and "no_edit" in kp:
                base = kp["no_edit"]["kernel_us_per_step"]
                L += [f"Device kernels per step at batch {bsz} (`--kernel-profile`, one traced generation each): "
                      + ", ".join(f"{name.replace('_', ' ')} {kp[name]['kernel_us_per_step']:.0f} us in "
                                  f"{kp[name]['kernels_per_step']:.0f} kernels"
                                  + ("" if name == "no_edit" else
                                     f" ({kp[name]['kernel_us_per_step'] - base:+.0f} us = "
                                     f"{100 * (kp[name]['kernel_us_per_step'] / base - 1):+.2f} %)")
                                  for name in kp if not name.startswith("diff_")) + ".", ""]
        rows = [(b, row) for b, row in c.get("batches", {}).items() if "jax_stacked" in row or "official" in row]
        if rows:
            L += ["Stacked layer layout (`--stacked 1`; not a verdict) and the official LLaDA code (`--official-dir`):", "",
                  "| batch | JAX step | JAX stacked step no edit / edit | stacked / floor | stacked "
                  "edit overhead | official forward | official step | tokens = JAX (stacked, official) |",
                  "|---|---|---|---|---|---|---|---|"]
            for bsz, row in rows:
                u, o = row.get("jax_stacked", {}), row.get("official", {})
                un, ue = u.get("no_edit", {}), u.get("edit", {})
                ag = row.get("agreement", {})
                L.append(f"| {bsz} | {r(row.get('jax', {}).get('no_edit', {}).get('step_ms'))} ms | "
                         f"{r(un.get('step_ms'))} / {r(ue.get('step_ms'))} ms | {r(un.get('ratio_to_floor'))} | "
                         f"{r(u.get('edit_overhead_pct'), 2)}% | {r(o.get('forward', {}).get('forward_ms'))} ms | "
                         f"{r(o.get('generate', {}).get('step_ms'))} ms | "
                         f"{ag.get('stacked_tokens_equal_fraction', {}).get('no_edit')}, "
                         f"{ag.get('official_tokens_equal_fraction', {}).get('no_edit')} |")
            L.append("")
        if c.get("official", {}).get("status") == "absent":
            L += [f"Official code not run: {c['official']['message']}", ""]
        grows = [(b, row["jax"]) for b, row in c.get("batches", {}).items() if "gated" in row.get("jax", {})]
        if grows:
            L += ["Gated memory, the latch default as `pipeline.install` builds it (the same facts, random whitened "
                  "slot keys, sequence latch, no per-token gate), the JAX rows' layout. Per step: one denoising step with "
                  "the latch primed vs the plain edit; probe: `model.prime_edit` once per generation:", "",
                  "| batch | edit step | gated step (primed) | per-step overhead over the edit [paired] | "
                  "as % of the no-edit step | probe | probe as % of a step / amortised over the steps | "
                  "whole generation: gated over edit, % of a step |",
                  "|---|---|---|---|---|---|---|---|"]
            for bsz, j in grows:
                one = j["gated"].get("one_step", {})
                ms = lambda x: r(None if x is None else 1e3 * x)
                L.append(f"| {bsz} | {ms(one.get('edit', {}).get('steady_s'))} ms | "
                         f"{ms(one.get('gated_primed', {}).get('steady_s'))} ms | "
                         f"{r(j.get('gate_step_overhead_pct_over_edit'), 2)}% "
                         f"[{r(j.get('gate_step_overhead_pct_over_edit_paired_median'), 2)}%] | "
                         f"{r(j.get('gate_step_overhead_pct_of_step'), 2)}% | "
                         f"{r(j['gated'].get('probe', {}).get('probe_ms'))} ms | "
                         f"{r(j.get('probe_pct_of_step'), 2)}% / {r(j.get('probe_amortised_pct_of_step'), 3)}% | "
                         f"{r(j.get('gate_overhead_pct_of_step'), 2)}% |")
            L.append("")
        for bsz, m in c.get("met", {}).items():
            L.append(f"- batch {bsz}: overhead <= 1%: {yes(m.get('edit_overhead_at_most_1pct'))} (medians), "
                     f"{yes(m.get('edit_overhead_paired_median_at_most_1pct'))} (paired); faster than torch: "
                     f"{yes(m.get('faster_than_torch'))}; step <= 1.5x floor: {yes(m.get('step_within_1p5x_floor'))}"
                     + (f"; gate per step <= 1%: {yes(m.get('gate_overhead_at_most_1pct'))}, with the amortised "
                        f"probe: {yes(m.get('gate_with_amortised_probe_at_most_1pct'))}"
                        if "gate_overhead_at_most_1pct" in m else ""))
        L += [""] + _status(c) + [""]

    d = figs.get("d")
    if d:
        L += ["## d. Memory the edit adds", "",
              "| batch | edit arrays | JAX + arguments | JAX + temp | JAX + peak (analysis) | torch peak no edit / edit | verdict |",
              "|---|---|---|---|---|---|---|"]
        for bsz, row in d.get("batches", {}).items():
            add = row.get("jax", {}).get("added", {})
            t = row.get("torch", {})
            met = row.get("met", {})
            verdict = "-" if not met else ("met" if all(met.values()) else "**missed** " + ", ".join(
                k for k, v in met.items() if not v))
            L.append(f"| {bsz} | {mb(row.get('edit_bytes'))} | {mb(add.get('argument_size_in_bytes'))} | "
                     f"{mb(add.get('temp_size_in_bytes'))} | {mb(add.get('peak_memory_in_bytes'))} | "
                     f"{mb(t.get('peak_above_start_no_edit'))} / {mb(t.get('peak_above_start_edit'))} | {verdict} |")
        L += [""] + _status(d) + [""]

    st = figs.get("stages")
    if st:
        L += ["## Where the sweep's time goes (stage variants on "
              f"{st.get('shapes', {}).get('lanes')} of {st.get('shapes', {}).get('of_lanes')} lanes)", "",
              "| variant | steady (runs) | per lane-step | compile |", "|---|---|---|---|"]
        for k, v in st.get("stages", {}).items():
            L.append(f"| {k} | {s(v.get('steady_s'))} ({n_of(v)}) | {r(v.get('per_lane_step_ms'))} ms | "
                     f"{s(v.get('compile_s'))} |")
        sh = st.get("share_of_full", {})
        if sh:
            L += ["", "Share of the full lane loop: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sh.items())
                  + f"; full / floor = {r(st.get('full_over_floor'))}."]
        if st.get("profile"):
            L.append(f"Profile of one steady `full` run: `{st['profile']['dir']}`.")
        L += [""] + _status(st) + [""]

    sc = figs.get("scaling")
    if sc:
        L += ["## Scaling over local devices (`timerome_jax.method.sharding.trace`)", ""]
        if sc.get("note"):
            L.append(sc["note"] + ".")
        L += ["| devices | compile | steady (runs) | speedup |", "|---|---|---|---|"]
        for k, v in sc.get("runs", {}).items():
            L.append(f"| {k} | {s(v.get('compile', {}).get('compile_s'))} | {s(v.get('steady_s'))} ({n_of(v)}) | "
                     f"{r((sc.get('speedup') or {}).get(k))} |")
        L += ["", "Targets: >= 1.8x on 2 devices, >= 3.4x on 4.", ""] + _status(sc) + [""]

    scr = figs.get("screen")
    if scr:
        sh = scr.get("shapes", {})
        ag = scr.get("agreement_with_full_sweep", {})
        sp = scr.get("screen_plus_topk", {})
        L += [f"## Screen: first-order TIE screen + exact TIE on the top {sh.get('top_frac')} of candidates vs the "
              f"full exact sweep ({sh.get('facts')} facts, {sh.get('cells')} cells)", "",
              "| screen alone | screen + exact top-k (candidates) | full exact sweep | speed-up | target |",
              "|---|---|---|---|---|",
              f"| {s(scr.get('screen', {}).get('steady_s'))} | {s(sp.get('steady_s'))} ({sp.get('n_candidates')}) | "
              f"{s(scr.get('full_sweep_s'))} | **{r(scr.get('full_over_screen_plus_topk'))}x** | >= 10x: "
              f"{yes(scr.get('met', {}).get('at_least_10x'))} |", ""]
        if ag:
            same = ag.get("same_coordinate", {})
            L.append(f"Same coordinate as the full sweep (Eq. 5): resid {yes(same.get('resid'))} "
                     f"(full {ag['coordinate_full']['resid']}, screened {ag['coordinate_screened']['resid']}); "
                     f"all modules {yes(same.get('all_modules'))}. Spearman rho of the screen's mean |estimate| vs "
                     f"the exact mean |TIE_bar|: {r(ag.get('spearman_screen_vs_exact_mean_abs'))}. Full sweep time "
                     f"from `{os.path.basename(str(scr.get('full_sweep_source')))}`.")
        L += [""] + _status(scr) + [""]

    va = figs.get("validate")
    if va:
        L += ["## `timerome validate` at the 8B shape (random weights, official LLaDA code)", ""]
        if "cases" in va:
            from timerome_jax.backbone.validate import summary_lines

            L += [f"    {x}" for x in summary_lines(va)]
            ph = va.get("phases_s") or {}
            L += ["", f"Checkpoint write {s(va.get('checkpoint_write_s'))}, validate {s(va.get('validate_s'))}"
                  + (" (" + ", ".join(f"{k.replace('_', ' ')} {s(v)}" for k, v in ph.items()) + ")" if ph else "")
                  + (f"; checkpoint in {va['checkpoint_folder']}" if va.get("checkpoint_folder") else "") + "."]
        L += [""] + _status(va) + [""]

    ra = os.path.join(folder, "run_all.json")
    if os.path.exists(ra):
        with open(ra) as f:
            log = json.load(f)
        L += ["## Run", "", f"run_all wall time {s(log.get('wall_s'))} (budget {s(log.get('budget_s'))}); jobs: "
              + ", ".join(f"{j['job']} {s(j['wall_s'])}" + (f" (beside {j['beside']})" if j.get("beside") else "")
                          + (" KILLED" if j["killed"] else "")
                          + (f" rc={j['rc']}" if j["rc"] else "") for j in log.get("jobs", []))]
        for p in log.get("plan", []):
            L.append(f"- GPU {p['device']}: " + ", ".join(f"{k} (expected {v} s)" for k, v in p.get("est_each_s", {}).items())
                     + "".join(f"; {c} beside {h}'s untimed compile phase" for h, c in (p.get("beside") or {}).items())
                     + (f"; expected {s(p['est_s'])} in all" if p.get("est_s") else ""))
        if log.get("skipped"):
            L.append("Skipped: " + ", ".join(f"{x['job']} ({x['why']})" for x in log["skipped"]))
        L.append("")
    missing = [k for k, _ in FIGS[:5] if k not in figs]
    if missing:
        L += [f"Not in this folder: {', '.join(missing)}.", ""]
    from timerome_jax.io import write_text

    path = os.path.join(folder, "summary.md")
    write_text(path, "\n".join(L))
    return path


if __name__ == "__main__":
    print(write_summary(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")))
