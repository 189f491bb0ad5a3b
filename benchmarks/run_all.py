"""Run the issue-5 benchmark figures in one go and write the Markdown summary.

    python3 benchmarks/run_all.py --out $OUT                          # ceiling, a, b, c, d (8B, GPU)
    python3 benchmarks/run_all.py --out $OUT --only ceiling,a         # pick figures
    python3 benchmarks/run_all.py --out $OUT --only ceiling,scaling   # on a multi-GPU machine
    python3 benchmarks/run_all.py --out /tmp/r --tiny                 # everything on a CPU, seconds

At the 8B shape on one H100 the least work of every figure takes about 9 minutes (a 261 s, b 111 s,
c and d more than 95 s: `results/h100_call13`, where `--budget-s 480` completed ceiling, a and b and
killed c/d). So run them as two calls, each with its own $OUT:
    python3 benchmarks/run_all.py --out $OUT --only ceiling,a
    python3 benchmarks/run_all.py --out $OUT --only ceiling,b,c,d
Knobs of one figure's script pass through --figure-args, e.g. --figure-args "a=--chunk 4 --torch-chunk 4".

Figures: ceiling (bench_ceiling), a (bench_tie --what sweep), b (bench_install), c and d (one
bench_generate run writes both), stages (bench_tie --what stages: the sweep with stages left out,
plus `--profile`), scaling (bench_tie --what scaling: 1, 2 and all local devices). The ceiling runs
first whenever any figure runs, so every floor uses a ceiling measured in the same run.

Each figure runs in its own Python process (a crash, an out-of-memory or a CUDA fault in one
loses nothing measured by the others; each process's peak-memory statistics are its own). Every
figure rewrites its JSON after each section; summary.md is rewritten after each figure.
--budget-s is the total wall-clock budget: a figure that would start with less than --min-left-s
left is skipped (recorded in run_all.json and summary.md), and a figure still running when the
budget ends is killed (its JSON keeps what it had saved, marked killed).
Each figure also gets a soft budget (its share, capped by what is left once the figures still to
come have their least time, `LEAST`) after which it stops taking optional repeats. Output files: ceiling.json, fig_a_tie.json, fig_b_install.json,
fig_c_generate.json, fig_d_memory.json, [tie_stages.json, tie_scaling.json], run_all.json,
summary.md (at most 9; the device tool brings back 8, so run stages/scaling in a separate call).
"""
from __future__ import annotations

import argparse
import json
import shlex
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

ORDER = ("ceiling", "a", "b", "c", "d", "stages", "scaling")
FILES = {"ceiling": ["ceiling.json"], "a": ["fig_a_tie.json"], "b": ["fig_b_install.json"],
         "cd": ["fig_c_generate.json", "fig_d_memory.json"], "stages": ["tie_stages.json"],
         "scaling": ["tie_scaling.json"]}
# soft budgets (s) for optional repeats at full size; the minimal work of a figure is not cut
SHARE = {"ceiling": 30, "a": 30, "b": 110, "cd": 110, "stages": 90, "scaling": 30}
# about the least each figure takes at full size on one H100 (one run of everything, compile and
# init included): a figure's soft budget leaves this much for every figure still to come
LEAST = {"ceiling": 15, "a": 265, "b": 110, "cd": 150, "stages": 60, "scaling": 220}


def _write_json(path, obj):
    from timerome_jax.io import write_json

    write_json(path, obj)


def jobs_for(only) -> list:
    """Figure names -> the scripts to run, in order (c and d share one run)."""
    want = [f for f in ORDER if f in only]
    jobs = []
    if want and "ceiling" not in want:
        want = ["ceiling"] + want
    for f in want:
        name = "cd" if f in ("c", "d") else f
        if name not in jobs:
            jobs.append(name)
    return jobs


def command(job: str, args, ceiling_json: str, budget: float) -> list:
    return _command(job, args, ceiling_json, budget) + shlex.split(args.extra.get(job, ""))


def _command(job: str, args, ceiling_json: str, budget: float) -> list:
    py = [sys.executable, "-u"]
    common = ["--out", args.out, "--budget-s", f"{budget:.0f}", "--seed", str(args.seed)]
    if args.tiny:
        common.append("--tiny")
    if job != "ceiling":
        common += ["--ceiling-json", ceiling_json]
    if args.skip_torch:
        common.append("--skip-torch")
    if job == "ceiling":
        return py + [os.path.join(HERE, "bench_ceiling.py")] + common
    if job in ("a", "stages", "scaling"):
        what = {"a": "sweep"}.get(job, job)
        cmd = py + [os.path.join(HERE, "bench_tie.py"), "--what", what] + common
        if job == "a":
            cmd += ["--repeats", str(args.repeats_a)]
        if job == "stages" and args.profile:
            cmd += ["--profile", os.path.join(args.profile, "tie_stages")]
        return cmd
    if job == "b":
        cmd = py + [os.path.join(HERE, "bench_install.py")] + common
        if args.profile:
            cmd += ["--profile", os.path.join(args.profile, "install")]
        return cmd + (["--repeats", str(args.repeats)] if args.repeats else [])
    if job == "cd":
        cmd = py + [os.path.join(HERE, "bench_generate.py")] + common
        if args.profile:
            cmd += ["--profile", os.path.join(args.profile, "generate")]
        return cmd + (["--repeats", str(args.repeats)] if args.repeats else [])
    raise ValueError(job)


def mark_killed(out: str, job: str, why: str, rc=None, tail: str = ""):
    """A figure that died: keep whatever its JSON saved, mark it, or write a stub saying so."""
    for name in FILES[job]:
        path = os.path.join(out, name)
        data = {"figure": name.split(".")[0], "status": "missing", "errors": {}}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                pass
        if data.get("status") not in ("ok", "partial"):
            data["status"] = why  # else keep the figure's own verdict; the note below says what happened
        data.setdefault("errors", {})["process"] = {"error": f"{why} (return code {rc})", "output_tail": tail[-4000:]}
        _write_json(path, data)


def run_job(job, cmd, timeout, out) -> dict:
    """Run one figure's process, streaming its output; kill it when `timeout` seconds have passed."""
    t0 = time.perf_counter()
    print(f"[run_all] {job}: {' '.join(cmd[2:])}", flush=True)
    tail = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killed = threading.Event()

    def kill():
        killed.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        for line in proc.stdout:  # stream the child's output, keep a tail for the record
            sys.stdout.write(line)
            tail = (tail + [line])[-200:]
        rc = proc.wait()
    finally:
        timer.cancel()
    wall = time.perf_counter() - t0
    text = "".join(tail)
    if killed.is_set():
        mark_killed(out, job, "killed (run_all budget)", rc, text)
    elif rc != 0:
        mark_killed(out, job, "crashed", rc, text)
    return {"job": job, "rc": rc, "killed": killed.is_set(), "wall_s": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default="ceiling,a,b,c,d", help=f"comma list from {','.join(ORDER)}")
    ap.add_argument("--budget-s", type=float, default=570.0, help="total wall-clock budget (s)")
    ap.add_argument("--min-left-s", type=float, default=None,
                    help="skip a figure if less than this is left (60; --tiny 5)")
    ap.add_argument("--repeats-a", type=int, default=1, help="timed full TIE sweeps per framework (figure a)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement in b, c (default 5)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile one steady JAX run of stages, b and c into DIR/<figure> (keep DIR outside "
                         "--out); OUT/profile.tar.gz packs DIR at the end")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure-args", action="append", default=[], metavar="FIG=ARGS",
                    help='extra arguments for one figure\'s script, e.g. "a=--chunk 4 --torch-chunk 4" or '
                         '"cd=--batches 1,16" (FIG: ceiling, a, b, cd, stages, scaling); repeatable')
    args = ap.parse_args(argv)
    args.extra = {}
    for item in args.figure_args:
        fig, sep, rest = item.partition("=")
        fig = "cd" if fig.strip() in ("c", "d") else fig.strip()
        if not sep or fig not in FILES:
            ap.error(f"--figure-args {item!r}: expected FIG=ARGS with FIG one of {sorted(FILES)}")
        args.extra[fig] = (args.extra.get(fig, "") + " " + rest).strip()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = set(only) - set(ORDER)
    if bad:
        ap.error(f"--only: unknown figures {sorted(bad)}; choose from {ORDER}")
    min_left = args.min_left_s if args.min_left_s is not None else (5.0 if args.tiny else 60.0)
    os.makedirs(args.out, exist_ok=True)
    import summarize

    t_start = time.perf_counter()
    ceiling_json = os.path.join(args.out, "ceiling.json")
    log = {"only": only, "budget_s": args.budget_s, "tiny": args.tiny, "args": vars(args), "jobs": [],
           "skipped": []}
    todo = jobs_for(only)
    for i, job in enumerate(todo):
        left = args.budget_s - (time.perf_counter() - t_start)
        later = sum(LEAST[j] for j in todo[i + 1:]) * (0.05 if args.tiny else 1.0)
        if left < min_left:
            log["skipped"].append({"job": job, "why": f"budget: {left:.0f}s left"})
            mark_killed(args.out, job, "skipped (run_all budget)")
            continue
        soft = min(SHARE[job] * (0.2 if args.tiny else 1.0), max(left - min_left - later, 1.0))
        if job == "a" and args.repeats_a > 1:
            soft = max(left - min_left, 1.0)  # extra full sweeps were asked for: let them use what is left
        res = run_job(job, command(job, args, ceiling_json, soft), left, args.out)
        log["jobs"].append(res)
        log["wall_s"] = time.perf_counter() - t_start
        _write_json(os.path.join(args.out, "run_all.json"), log)
        summarize.write_summary(args.out)
    if args.profile and os.path.isdir(args.profile):
        tar = os.path.join(args.out, "profile.tar.gz")
        with tarfile.open(tar, "w:gz") as t:
            t.add(args.profile, arcname=os.path.basename(args.profile.rstrip("/")))
        log["profile_tar"] = tar
    log["wall_s"] = time.perf_counter() - t_start
    _write_json(os.path.join(args.out, "run_all.json"), log)
    path = summarize.write_summary(args.out)
    print(f"[run_all] done in {log['wall_s']:.0f}s; summary: {path}", flush=True)
    bad_jobs = [j for j in log["jobs"] if j["rc"] != 0 or j["killed"]]
    return 1 if bad_jobs else 0


if __name__ == "__main__":
    sys.exit(main())
