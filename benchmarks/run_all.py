"""Run every benchmark figure in one call and write benchmarks/results/latest/ (+ summary.md).

    python3 benchmarks/run_all.py --official-dir .official/llada --out $OUT/latest   # device: one H200, one call
    python3 benchmarks/run_all.py --out $OUT --only ceiling,a       # pick figures
    python3 benchmarks/run_all.py --out /tmp/r --tiny --official-dir .official/llada       # CPU, about a minute

One call on ONE GPU, reduced sizes and repeat counts: the default entry (ceiling, a, b, c, d, screen,
validate) is expected to take about 470 s of one H200 (the `est` values below, the means of two
calls: ceiling 17, a+screen 218, b 81, cd 150, validate 72, which runs beside a+screen's untimed
compile phase of about 85 s), against --budget-s 540: four calls took 461, 483, 491 and 452 s
(benchmarks/results/README.md).
- a + screen: ONE process (`a+screen`: bench_tie --what sweep,screen, one init): ONE timed full TIE
  sweep per framework (--repeats-a 1) on 4 facts (the figure's own default is 8), 16 lanes per chunk
  so a forward still holds 64 rows, in the unstacked layout (--tie-layout, the GPU default); the
  screen's programs compile in a thread beside the sweep's, its timed calls follow the sweep and are
  compared with it (time and Eq. 5's coordinate);
- b: |F| = 1, 40, 400 (bench_install's default adds 4000), 2 timed repeats per measurement (the
  |F| = 1 unstacked row takes 21);
- c/d: the verdict rows (no edit, edit, gated) in the unstacked layout, in interleaved rounds (each
  in an order drawn from the seed, 50 ms idle before each call: bench_generate --idle-gap-s): 21 at
  batch 1 (bench_generate --repeats-b1 21: the edit-overhead bar is 1 %), 2 at batch 32 (--repeats
  2); torch hooks one interleaved pair per batch size (--torch-repeats 1); the official LLaDA code
  one generation per batch size; the stacked rows are left out (bench_generate --stacked 1 adds them);
- validate: with --overlap-validate 1 (default) and one GPU, validate_8b starts with a+screen and
  runs beside its init and compile phase; a+screen times nothing until validate has ended (its JSON
  says how long it waited: held_after_compile), so no timed run shares the GPU.
Every figure stops taking optional repeats at its soft budget (SHARE, capped so that the jobs still
to come on its GPU keep their least time, LEAST); the JAX verdict rounds of c are not cut below 9 at
batch 1 and 3 above (or --repeats, when fewer). Run a figure alone with more --repeats for tighter
numbers.

--gpus N (default: every visible GPU) runs the figure processes in parallel, one per GPU
(CUDA_VISIBLE_DEVICES per process), planned by expected seconds at full size (`est` below; `plan`):
the ceiling first on GPU 0 (the others wait for it unless they start with `validate`, which needs
none), then the longest job onto the least-loaded GPU. With N > 1, c/d (one bench_generate run) is
split into one process per batch size (OUT/parts/cd@B, merged into OUT/fig_c_generate.json and
fig_d_memory.json). The plan and each job's expected time are printed and kept in run_all.json.

Figures (FIGURES below; to add one, add an entry: its script, fixed arguments, output files, soft
budget, least time, expected time and whether it takes --repeats / --profile): ceiling
(bench_ceiling), a (bench_tie --what sweep), b (bench_install), c and d (bench_generate: the unstacked
layout with and without the edit, the gated edit, torch hooks, and the official LLaDA code with
--official-dir), screen (bench_tie --what screen), a+screen (both in one process, used whenever both
are asked for), validate (validate_8b: `timerome validate` at the 8B shape against the official
code; needs --official-dir, else recorded as skipped), stages (bench_tie --what stages), scaling
(bench_tie --what scaling). Every floor uses the ceiling measured in the same run.

Each figure runs in its own Python process (a crash, an out-of-memory or a CUDA fault in one
loses nothing measured by the others; each process's peak-memory statistics are its own). Every
figure rewrites its JSON after each section; summary.md is rewritten after each job.
--budget-s is the total wall-clock budget: a job that would start with less than --min-left-s
left is skipped (recorded in run_all.json and summary.md), and a job still running when the
budget ends is killed (its JSON keeps what it had saved, marked killed).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# name -> script, fixed arguments, output files, soft budget (s) for optional repeats at full size,
# about the least it takes at full size on one H200 (compile and init included; a figure's soft
# budget leaves this much for every figure still to come), the expected seconds at full size on one
# H200 (est), whether it takes --repeats / --profile
FIGURES = {
    "ceiling": dict(script="bench_ceiling.py", args=[], files=["ceiling.json"], share=30, least=15, est=17),
    # figure a at a documented reduced size: 4 facts (the figure's own default is 8), 16 lanes per
    # chunk so a forward still holds 64 rows
    "a": dict(script="bench_tie.py", args=["--what", "sweep", "--facts", "4"],
              full_args=["--chunk", "16", "--torch-chunk", "16"], files=["fig_a_tie.json"], share=30, least=130,
              est=150),
    # a and screen asked for together: one process (one init; the screen's compiles beside a's, its
    # timed calls after a's sweep, compared with a's JAX time and coordinate)
    "a+screen": dict(script="bench_tie.py", args=["--what", "sweep,screen", "--facts", "4"],
                     full_args=["--chunk", "16", "--torch-chunk", "16"], files=["fig_a_tie.json", "tie_screen.json"],
                     share=30, least=180, est=218, covers=("a", "screen"), overlap_s=85),
    # b without |F| = 4000 (about 80 s alone at 8B; bench_install.py runs it by default); --gate: the
    # default gated install (slot keys + tau_seq) beside it, and the gate calibration once
    "b": dict(script="bench_install.py", args=["--gate"], full_args=["--sizes", "1,40,400"],
              files=["fig_b_install.json"], share=60, least=50, repeats=True, profile="install", est=81),
    # c/d: the verdict rows in the unstacked layout (the GPU default), the stacked rows left out
    # (bench_generate --stacked 1 adds them)
    "cd": dict(script="bench_generate.py", args=["--gate", "--stacked", "0"],
               full_args=["--repeats-b1", "21", "--torch-repeats", "1"],
               files=["fig_c_generate.json", "fig_d_memory.json"], share=240, least=150, repeats=True,
               profile="generate", official=True, est=150,
               split=("--batches", {"full": ["1", "32"], "tiny": ["1", "4"]}, {"1": 0.3})),
    # screen alone (without a) times its own full sweep for the comparison
    "screen": dict(script="bench_tie.py", args=["--what", "screen", "--facts", "4"],
                   full_args=["--chunk", "16", "--torch-chunk", "16"], files=["tie_screen.json"], share=30,
                   least=100, est=170, after="a"),
    # validate times nothing that is a verdict: with --overlap-validate (default) it runs beside
    # a+screen's untimed compile phase when both share a GPU (`run_with_companion`)
    "validate": dict(script="validate_8b.py", args=[], files=["validate_8b.json"], share=0, least=80, est=72,
                     needs_official=True, plain=True, host="a+screen"),
    "stages": dict(script="bench_tie.py", args=["--what", "stages"], files=["tie_stages.json"], share=90,
                   least=60, profile="tie_stages", est=120),
    "scaling": dict(script="bench_tie.py", args=["--what", "scaling"], files=["tie_scaling.json"], share=30,
                    least=220, est=250),
}
ALIASES = {"c": "cd", "d": "cd"}
DEFAULT = "ceiling,a,b,c,d,screen,validate"
ORDER = ("ceiling", "a", "b", "c", "d", "screen", "validate", "stages", "scaling")
FILES = {k: v["files"] for k, v in FIGURES.items()}
COVERS = {k: v["covers"] for k, v in FIGURES.items() if "covers" in v}
SHARE = {k: v["share"] for k, v in FIGURES.items()}
LEAST = {k: v["least"] for k, v in FIGURES.items()}
LATEST = os.path.join(HERE, "results", "latest")


def _write_json(path, obj):
    from timerome_jax.io import write_json

    write_json(path, obj)


def jobs_for(only) -> list:
    """Figure names -> the figure jobs to run, in FIGURES order (c and d share one run; a and screen
    asked for together share one run, "a+screen"), ceiling first."""
    want = {ALIASES.get(f, f) for f in only}
    if want:
        want.add("ceiling")
    for job, covers in COVERS.items():
        if set(covers) <= want:
            want = (want - set(covers)) | {job}
    return [job for job in FIGURES if job in want]


def expand(figs, args) -> list:
    """Figure jobs -> process jobs: dicts name, fig, extra (arguments), out, est, least, share. With more
    than one GPU a figure with a `split` (cd) becomes one process per batch size, each in
    OUT/parts/<name>, merged into OUT afterwards (`merge_parts`)."""
    jobs = []
    for fig in figs:
        f = FIGURES[fig]
        base = dict(fig=fig, extra=[], out=args.out, est=f["est"], least=f["least"], share=f["share"])
        sp = f.get("split")
        if sp and args.gpus > 1:
            flag, values, frac = sp
            vals = values["tiny" if args.tiny else "full"]
            rest = 1.0 - sum(frac.get(v, 0.0) for v in vals)
            default = rest / max(1, sum(1 for v in vals if v not in frac))
            for v in vals:
                w = frac.get(v, default)
                jobs.append({**base, "name": f"{fig}@{v}", "extra": [flag, v],
                             "out": os.path.join(args.out, "parts", f"{fig}@{v}"), "est": f["est"] * w,
                             "least": f["least"] * w, "share": f["share"] * w, "part_of": fig})
        else:
            jobs.append({**base, "name": fig})
    return jobs


def plan(jobs, gpus: int) -> list:
    """Jobs -> one ordered list per GPU (lane), by expected seconds at full size (`est`). The ceiling
    runs first on lane 0 and every other lane waits for it, unless it starts with a job that needs
    no ceiling (`plain`: validate), so those go first onto the other lanes; then the longest chain
    onto the least-loaded lane (LPT). A job with `after` runs right after that job on its lane. One
lane: the jobs in FIGURES order."""
    if gpus == 1:  # one lane: FIGURES order (screen comes after a there too)
        return [list(jobs)]
    lanes, load = [[] for _ in range(gpus)], [0.0] * gpus
    by_name = {j["name"]: j for j in jobs}
    chains, taken = [], set()
    c_est = by_name["ceiling"]["est"] if "ceiling" in by_name else 0.0
    if "ceiling" in by_name:
        lanes[0].append(by_name["ceiling"])
        taken.add("ceiling")
    load = [c_est] * gpus  # lanes other than 0 wait for the ceiling
    for j in jobs:
        if j["name"] in taken:
            continue
        chain = [j]
        taken.add(j["name"])
        for k in jobs:
            if FIGURES[k["fig"]].get("after") == j["fig"] and k["name"] not in taken:
                chain.append(k)
                taken.add(k["name"])
        chains.append(chain)
    plain = sorted([c for c in chains if FIGURES[c[0]["fig"]].get("plain")], key=lambda c: -sum(j["est"] for j in c))
    for chain in plain:
        others = [i for i in range(gpus) if i != 0 and not lanes[i]] or list(range(gpus))
        i = min(others, key=lambda k: load[k])
        est = sum(j["est"] for j in chain)
        load[i] = est + (load[i] - c_est if lanes[i] or i == 0 else max(c_est - est, 0.0))
        lanes[i].extend(chain)
    for chain in sorted([c for c in chains if c not in plain], key=lambda c: -sum(j["est"] for j in c)):
        i = min(range(gpus), key=lambda k: load[k])
        lanes[i].extend(chain)
        load[i] += sum(j["est"] for j in chain)
    return lanes


def command(job: dict, args, ceiling_json: str, budget: float) -> list:
    extra = [args.extra.get(f, "") for f in COVERS.get(job["fig"], (job["fig"],))]
    return _command(job, args, ceiling_json, budget) + shlex.split(" ".join(extra))


def _command(job: dict, args, ceiling_json: str, budget: float) -> list:
    name = job["fig"]
    fig = FIGURES[name]
    cmd = [sys.executable, "-u", os.path.join(HERE, fig["script"])] + list(fig["args"])
    if not args.tiny:
        cmd += list(fig.get("full_args", []))
    cmd += ["--out", job["out"], "--seed", str(args.seed)] + list(job["extra"])
    if args.tiny:
        cmd.append("--tiny")
    if fig.get("needs_official"):
        cmd += ["--official-dir", args.official_dir]
    if fig["script"] == "bench_tie.py":
        cmd += ["--layout", args.tie_layout]
    if fig.get("plain"):
        return cmd
    cmd += ["--budget-s", f"{budget:.0f}"]
    if name != "ceiling":
        cmd += ["--ceiling-json", ceiling_json]
    if args.skip_torch:
        cmd.append("--skip-torch")
    if name in ("a", "a+screen"):
        cmd += ["--repeats", str(args.repeats_a)]
    if fig.get("repeats") and args.repeats:
        cmd += ["--repeats", str(args.repeats)]
    if fig.get("profile") and args.profile:
        cmd += ["--profile", os.path.join(args.profile, fig["profile"] + job["name"][len(name):])]
    if fig.get("official") and args.official_dir:
        cmd += ["--official-dir", args.official_dir]
    return cmd


def merge_parts(out: str, fig: str, parts: list) -> None:
    """The per-batch processes of a split figure -> its files in OUT: `batches` and `met` are the
    union, `errors` keep each part's under its name, other top-level keys come from the first part
    that has them (each part's own copy stays under `parts`)."""
    for fname in FILES[fig]:
        datas = []
        for p in parts:
            path = os.path.join(p["out"], fname)
            if os.path.exists(path):
                try:
                    with open(path) as f:
                        datas.append((p["name"], json.load(f)))
                except (OSError, ValueError) as e:
                    datas.append((p["name"], {"status": f"unreadable ({e})", "errors": {}}))
            else:
                datas.append((p["name"], {"status": "missing", "errors": {}}))
        merged = {"parts": {}, "batches": {}, "met": {}, "errors": {}}
        statuses = []
        for pname, d in datas:
            statuses.append(d.get("status"))
            merged["batches"].update(d.get("batches") or {})
            merged["met"].update(d.get("met") or {})
            for k, v in (d.get("errors") or {}).items():
                merged["errors"][k if len(datas) == 1 else f"{k} ({pname})"] = v
            for k, v in d.items():
                if k not in merged and k not in ("batches", "met", "errors", "status"):
                    merged[k] = v
            merged["parts"][pname] = {k: v for k, v in d.items() if k not in ("batches", "met", "errors")}
        if "shapes" in merged and isinstance(merged["shapes"], dict):
            merged["shapes"] = {**merged["shapes"], "batches": [int(b) for b in merged["batches"]]}
        merged["status"] = "ok" if all(x == "ok" for x in statuses) else (
            "partial" if any(x in ("ok", "partial") for x in statuses) else (statuses[0] or "missing"))
        merged["merged_from"] = [p["out"] for p in parts]
        _write_json(os.path.join(out, fname), merged)


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


def run_job(job: dict, cmd, timeout, device=None, env_extra=None, prefix=False) -> dict:
    """Run one figure's process (on `device`: its CUDA_VISIBLE_DEVICES; env_extra: more environment),
    streaming its output with the job's name in front (when on a device or `prefix`); kill it when
    `timeout` seconds have passed."""
    name = job["name"]
    t0 = time.perf_counter()
    print(f"[run_all] {name}" + ("" if device is None else f" (GPU {device})") + f": {' '.join(cmd[2:])}"
          + (f" [env {' '.join(f'{k}={v}' for k, v in env_extra.items())}]" if env_extra else ""), flush=True)
    tail = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    os.makedirs(job["out"], exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killed = threading.Event()

    def kill():
        killed.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()

    timer = threading.Timer(max(timeout, 0.0), kill)
    timer.start()
    try:
        for line in proc.stdout:  # stream the child's output, keep a tail for the record
            sys.stdout.write(line if device is None and not prefix else f"[{name}] {line}")
            tail = (tail + [line])[-200:]
        rc = proc.wait()
    finally:
        timer.cancel()
    wall = time.perf_counter() - t0
    text = "".join(tail)
    if killed.is_set():
        mark_killed(job["out"], job["fig"], "killed (run_all budget)", rc, text)
    elif rc != 0:
        mark_killed(job["out"], job["fig"], "crashed", rc, text)
    return {"job": name, "rc": rc, "killed": killed.is_set(), "wall_s": wall, "device": device,
            "est_s": job["est"]}


def attach_companions(lanes) -> None:
    """On a lane holding both a job whose figure has `host` (validate) and that host (a+screen),
    take the first out of the lane's order and run it beside the host's untimed compile phase
    (`run_with_companion`)."""
    for lane in lanes:
        for job in list(lane):
            host = FIGURES[job["fig"]].get("host")
            target = next((j for j in lane if j["name"] == host), None)
            if target is not None and "companion" not in target:
                lane.remove(job)
                target["companion"] = job


def lane_est(lane) -> float:
    """Expected seconds of a lane: each job's est, a companion adding only what it outlasts the
    host's untimed phase by (its `overlap_s`)."""
    total = 0.0
    for j in lane:
        total += j["est"]
        c = j.get("companion")
        if c is not None:
            total += max(c["est"] - FIGURES[j["fig"]].get("overlap_s", 0.0), 0.0)
    return total


def run_with_companion(job, comp, args, ceiling_json, soft, left, dev, t_start, record) -> dict:
    """Run `job` (bench_tie) with --ready-file / --hold-file: it writes the ready file when its
    untimed compile phase starts and, when the phase is over, waits until the hold file is gone
    before it times anything. The companion (validate_8b, which times nothing that is a verdict)
    starts at the ready file (or when the job ends without one) and the hold file is removed when
    it ends, so no timed run of the job overlaps it. Memory on the shared GPU: the job's JAX pool is
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 of the card (unless set), the companion's JAX allocates on
    demand (XLA_PYTHON_CLIENT_PREALLOCATE=false); the companion's result is recorded on its own."""
    sync = tempfile.mkdtemp(prefix="run_all_sync_")
    ready, hold = os.path.join(sync, "ready"), os.path.join(sync, "hold")
    with open(hold, "w") as f:
        f.write(comp["name"])
    ended = threading.Event()

    def companion():
        try:
            while not os.path.exists(ready) and not ended.is_set():
                time.sleep(0.25)
            c_left = args.budget_s - (time.perf_counter() - t_start)
            env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
            res = run_job(comp, command(comp, args, ceiling_json, 0.0), c_left, dev, env_extra=env, prefix=True)
            res["beside"] = job["name"] if not ended.is_set() else None
            record(res)
        finally:
            try:
                os.remove(hold)
            except OSError:
                pass

    th = threading.Thread(target=companion, daemon=True)
    th.start()
    env = {} if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ else {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"}
    cmd = command(job, args, ceiling_json, soft) + ["--ready-file", ready, "--hold-file", hold]
    try:
        res = run_job(job, cmd, left, dev, env_extra=env, prefix=True)
    finally:
        ended.set()
        th.join()
        shutil.rmtree(sync, ignore_errors=True)
    res["companion"] = comp["name"]
    return res


def visible_gpus() -> list:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=LATEST, help="output folder (default benchmarks/results/latest)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default=DEFAULT, help=f"comma list from {','.join(ORDER)} (default {DEFAULT})")
    ap.add_argument("--gpus", type=int, default=None,
                    help="figure processes run in parallel, one per GPU (CUDA_VISIBLE_DEVICES per process), "
                         "balanced by expected time (default: every visible GPU; 1 without any)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="total wall-clock budget (s; default 540)")
    ap.add_argument("--min-left-s", type=float, default=None,
                    help="skip a figure if less than this is left (60; --tiny 5)")
    ap.add_argument("--repeats-a", type=int, default=1, help="timed full TIE sweeps per framework (figure a)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per measurement in b, c (default 2; "
                    "the reduced count that fits one call)")
    ap.add_argument("--official-dir", default=None, metavar="PATH",
                    help="folder with the official LLaDA modeling_llada.py + configuration_llada.py (figure c "
                         "times it beside the library, `validate` checks the library against it at the 8B "
                         "shape; default: neither runs)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile one steady JAX run of stages, b and c into DIR/<figure> (keep DIR outside "
                         "--out); OUT/profile.tar.gz packs DIR at the end")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--overlap-validate", type=int, default=1, choices=(0, 1),
                    help="1 (default): when validate and a+screen share a GPU, run validate beside a+screen's "
                         "untimed compile phase (a+screen times nothing until validate has ended); 0: one after "
                         "the other")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tie-layout", choices=("stacked", "unstacked"), default="unstacked",
                    help="params layout of the TIE figures (a, screen, stages, scaling; bench_tie --layout): "
                         "unstacked (default: per-layer arrays, the GPU default of load_model) or stacked (one "
                         "[L, ...] array per weight; compiles faster)")
    ap.add_argument("--figure-args", action="append", default=[], metavar="FIG=ARGS",
                    help='extra arguments for one figure\'s script, e.g. "a=--chunk 4 --torch-chunk 4" or '
                         '"cd=--repeats 2" (FIG: ceiling, a, b, cd, screen, validate, stages, scaling); repeatable')
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
    gpus = visible_gpus()
    if args.gpus is None:
        args.gpus = max(1, len(gpus))
    if args.gpus < 1:
        ap.error("--gpus must be at least 1")
    if gpus and args.gpus > len(gpus):
        ap.error(f"--gpus {args.gpus}: only {len(gpus)} visible ({','.join(gpus)})")
    devices = gpus[:args.gpus] if gpus else ([None] if args.gpus == 1 else [str(i) for i in range(args.gpus)])
    min_left = args.min_left_s if args.min_left_s is not None else (5.0 if args.tiny else 60.0)
    scale = 0.05 if args.tiny else 1.0
    os.makedirs(args.out, exist_ok=True)
    import summarize

    t_start = time.perf_counter()
    ceiling_json = os.path.join(args.out, "ceiling.json")
    log = {"only": only, "budget_s": args.budget_s, "tiny": args.tiny, "gpus": args.gpus, "devices": devices,
           "args": vars(args), "jobs": [], "skipped": []}
    figs = jobs_for(only)
    if "validate" in figs and not args.official_dir:
        figs.remove("validate")
        log["skipped"].append({"job": "validate", "why": "no --official-dir"})
    jobs = expand(figs, args)
    lanes = plan(jobs, len(devices))
    if args.overlap_validate:
        attach_companions(lanes)
    log["plan"] = [{"device": devices[i], "jobs": [j["name"] for j in lane], "est_s": lane_est(lane),
                    "est_each_s": {j["name"]: round(j["est"]) for j in lane},
                    "beside": {j["name"]: j["companion"]["name"] for j in lane if j.get("companion")}}
                   for i, lane in enumerate(lanes)]
    for p in log["plan"]:
        print(f"[run_all] GPU {p['device']}: {', '.join(p['jobs'])}"
              + "".join(f" ({c} beside {j})" for j, c in p["beside"].items())
              + f" (expected {p['est_s']:.0f} s at full size)", flush=True)
    lock = threading.Lock()
    ceiling_done = threading.Event()
    if not any(j["name"] == "ceiling" for j in jobs):
        ceiling_done.set()
    parts_left = {}
    for j in jobs:
        if j.get("part_of"):
            parts_left.setdefault(j["part_of"], []).append(j)
    finished = set()

    def record(res):
        with lock:
            log["jobs"].append(res)
            log["wall_s"] = time.perf_counter() - t_start
            _write_json(os.path.join(args.out, "run_all.json"), log)
            finished.add(res["job"])
            for fig, parts in parts_left.items():
                if res["job"] in [p["name"] for p in parts]:
                    merge_parts(args.out, fig, parts)
            summarize.write_summary(args.out)

    def lane_worker(i):
        lane = lanes[i]
        for k, job in enumerate(lane):
            if job["name"] != "ceiling" and not FIGURES[job["fig"]].get("plain"):
                ceiling_done.wait(max(args.budget_s - (time.perf_counter() - t_start), 0.0))
            left = args.budget_s - (time.perf_counter() - t_start)
            later = sum(j["least"] for j in lane[k + 1:]) * scale
            if left < min_left:
                with lock:
                    log["skipped"].append({"job": job["name"], "why": f"budget: {left:.0f}s left"})
                    mark_killed(job["out"], job["fig"], "skipped (run_all budget)")
                if job["name"] == "ceiling":
                    ceiling_done.set()
                record({"job": job["name"], "rc": None, "killed": False, "wall_s": 0.0, "device": devices[i],
                        "est_s": job["est"], "skipped": True})
                continue
            soft = min(job["share"] * (0.2 if args.tiny else 1.0), max(left - min_left - later, 1.0))
            if job["fig"] in ("a", "a+screen") and args.repeats_a > 1:
                soft = max(left - min_left - later, 1.0)  # extra full sweeps were asked for: let them use the rest
            dev = devices[i] if len(devices) > 1 else None
            comp = job.get("companion")
            try:
                if comp is None:
                    res = run_job(job, command(job, args, ceiling_json, soft), left, dev)
                else:
                    res = run_with_companion(job, comp, args, ceiling_json, soft, left, dev, t_start, record)
            finally:
                if job["name"] == "ceiling":
                    ceiling_done.set()
            record(res)

    threads = [threading.Thread(target=lane_worker, args=(i,), daemon=True) for i in range(len(lanes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if args.profile and os.path.isdir(args.profile):
        tar = os.path.join(args.out, "profile.tar.gz")
        with tarfile.open(tar, "w:gz") as t:
            t.add(args.profile, arcname=os.path.basename(args.profile.rstrip("/")))
        log["profile_tar"] = tar
    log["wall_s"] = time.perf_counter() - t_start
    _write_json(os.path.join(args.out, "run_all.json"), log)
    path = summarize.write_summary(args.out)
    print(f"[run_all] done in {log['wall_s']:.0f}s; summary: {path}", flush=True)
    bad_jobs = [j for j in log["jobs"] if (j["rc"] not in (0, None)) or j["killed"]]
    return 1 if bad_jobs else 0


if __name__ == "__main__":
    sys.exit(main())
