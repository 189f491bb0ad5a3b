"""Run every benchmark figure in one call and write benchmarks/results/latest/ (+ summary.md).

    python3 benchmarks/run_all.py                                   # all figures -> benchmarks/results/latest
    python3 benchmarks/run_all.py --out $OUT --official-dir .official/llada   # on the device (one call)
    python3 benchmarks/run_all.py --out $OUT --only ceiling,a       # pick figures
    python3 benchmarks/run_all.py --out /tmp/r --tiny               # everything on a CPU, seconds

One call, reduced repeat count. The default is the whole entry in one device call of at most 9
minutes (--budget-s 540): figure a runs ONE timed full TIE sweep per framework (--repeats-a 1);
b and c/d take 3 timed repeats per measurement (--repeats 3, the figures' own default is 5), and
every figure stops taking optional repeats at its soft budget (SHARE, capped so that the figures
still to come keep their least time, LEAST). The medians are therefore of 1-3 runs; run a figure
alone with more --repeats for tighter numbers.

Figures (FIGURES below; to add one, add an entry: its script, fixed arguments, output files, soft
budget, least time and whether it takes --repeats / --profile): ceiling (bench_ceiling), a
(bench_tie --what sweep), b (bench_install), c and d (one bench_generate run writes both: stacked
and unstacked layer layouts, and the official LLaDA code with --official-dir), stages (bench_tie
--what stages), scaling (bench_tie --what scaling: 1, 2 and all local devices), screen (bench_tie
--what screen: the first-order screen + exact TIE on the top 5% against figure a's full sweep; last
in the default list, so it runs on what is left and is skipped, and recorded so, when nothing is). The ceiling runs
first whenever any figure runs, so every floor uses a ceiling measured in the same run.

Each figure runs in its own Python process (a crash, an out-of-memory or a CUDA fault in one
loses nothing measured by the others; each process's peak-memory statistics are its own). Every
figure rewrites its JSON after each section; summary.md is rewritten after each figure.
--budget-s is the total wall-clock budget: a figure that would start with less than --min-left-s
left is skipped (recorded in run_all.json and summary.md), and a figure still running when the
budget ends is killed (its JSON keeps what it had saved, marked killed).
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

# name -> script, fixed arguments, output files, soft budget (s) for optional repeats at full size,
# about the least it takes at full size on one H100 (compile and init included; a figure's soft
# budget leaves this much for every figure still to come), whether it takes --repeats / --profile
FIGURES = {
    "ceiling": dict(script="bench_ceiling.py", args=[], files=["ceiling.json"], share=30, least=15),
    "a": dict(script="bench_tie.py", args=["--what", "sweep"], files=["fig_a_tie.json"], share=30, least=265),
    "b": dict(script="bench_install.py", args=[], files=["fig_b_install.json"], share=110, least=110,
              repeats=True, profile="install"),
    "cd": dict(script="bench_generate.py", args=[], files=["fig_c_generate.json", "fig_d_memory.json"],
               share=110, least=150, repeats=True, profile="generate", official=True),
    "screen": dict(script="bench_tie.py", args=["--what", "screen"], files=["tie_screen.json"], share=30, least=60),
    "stages": dict(script="bench_tie.py", args=["--what", "stages"], files=["tie_stages.json"], share=90,
                   least=60, profile="tie_stages"),
    "scaling": dict(script="bench_tie.py", args=["--what", "scaling"], files=["tie_scaling.json"], share=30,
                    least=220),
}
ALIASES = {"c": "cd", "d": "cd"}
DEFAULT = "ceiling,a,b,c,d,screen"
ORDER = tuple(f for job in FIGURES for f in ({v for k, v in ALIASES.items()} == {job} and sorted(ALIASES) or [job]))
FILES = {k: v["files"] for k, v in FIGURES.items()}
SHARE = {k: v["share"] for k, v in FIGURES.items()}
LEAST = {k: v["least"] for k, v in FIGURES.items()}
LATEST = os.path.join(HERE, "results", "latest")


def _write_json(path, obj):
    from timerome_jax.io import write_json

    write_json(path, obj)


def jobs_for(only) -> list:
    """Figure names -> the jobs to run, in FIGURES order (c and d share one run), ceiling first."""
    want = {ALIASES.get(f, f) for f in only}
    if want:
        want.add("ceiling")
    return [job for job in FIGURES if job in want]


def command(job: str, args, ceiling_json: str, budget: float) -> list:
    return _command(job, args, ceiling_json, budget) + shlex.split(args.extra.get(job, ""))


def _command(job: str, args, ceiling_json: str, budget: float) -> list:
    fig = FIGURES[job]
    cmd = [sys.executable, "-u", os.path.join(HERE, fig["script"])] + list(fig["args"])
    cmd += ["--out", args.out, "--budget-s", f"{budget:.0f}", "--seed", str(args.seed)]
    if args.tiny:
        cmd.append("--tiny")
    if job != "ceiling":
        cmd += ["--ceiling-json", ceiling_json]
    if args.skip_torch:
        cmd.append("--skip-torch")
    if job == "a":
        cmd += ["--repeats", str(args.repeats_a)]
    if fig.get("repeats") and args.repeats:
        cmd += ["--repeats", str(args.repeats)]
    if fig.get("profile") and args.profile:
        cmd += ["--profile", os.path.join(args.profile, fig["profile"])]
    if fig.get("official") and args.official_dir:
        cmd += ["--official-dir", args.official_dir]
    return cmd


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
    ap.add_argument("--out", default=LATEST, help="output folder (default benchmarks/results/latest)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default=DEFAULT, help=f"comma list from {','.join(ORDER)} (default {DEFAULT})")
    ap.add_argument("--budget-s", type=float, default=540.0, help="total wall-clock budget (s; default 540)")
    ap.add_argument("--min-left-s", type=float, default=None,
                    help="skip a figure if less than this is left (60; --tiny 5)")
    ap.add_argument("--repeats-a", type=int, default=1, help="timed full TIE sweeps per framework (figure a)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement in b, c (default 3; "
                    "the reduced count that fits one call)")
    ap.add_argument("--official-dir", default=None, metavar="PATH",
                    help="folder with the official LLaDA modeling_llada.py + configuration_llada.py (figure c "
                         "times it beside the library; default: not run)")
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
        fig = ALIASES.get(fig.strip(), fig.strip())
        if not sep or fig not in FILES:
            ap.error(f"--figure-args {item!r}: expected FIG=ARGS with FIG one of {sorted(FILES)}")
        args.extra[fig] = (args.extra.get(fig, "") + " " + rest).strip()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = set(only) - set(ORDER) - set(FIGURES)
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
