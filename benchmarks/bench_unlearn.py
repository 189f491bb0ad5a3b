"""GPU cost of the training-time unlearning baselines at the LLaDA-8B shape (issue 11, deliverable 5).

Per method (ga, gd, npo, simnpo, adaptive_rmu, mdu), the jitted train step of
`timerome_jax.baselines.train` on random bf16 weights with 40 forget + 40 retain QA rows of 128
tokens (64 prompt + 64 answer tokens, random ids):

- LoRA (rank --lora-rank on wq/wk/wv/wo; Adaptive-RMU: its own full-parameter w_down of layers
  l-2..l) on ONE GPU;
- full-parameter (every layer matrix trained, adamw state for all of them) with params, gradients
  and optimizer state sharded FSDP-style over TWO GPUs (jax.sharding: every array split along its
  largest axis divisible by the device count; the batch split along rows).

Reported: compile seconds, steady-state seconds per step (median of --repeats), seconds for the
step count the CPU run used (--steps-used; `timerome compare`'s default budget is 20), and the peak
device memory (`memory_stats()["peak_bytes_in_use"]`, max over the devices used). Each
(method, mode) runs in its own process so that the peak is its own. TimeROME's install on the
same card comes from benchmarks/bench_install.py (pass its JSON with --install-json to set it
beside); the paper reports 17-54 s and 35-51 GB extra for gradient methods vs 3.87 s / 0 GB.

    python benchmarks/bench_unlearn.py --out benchmarks/results/unlearn_h200 --budget-s 560 --modes lora
    python benchmarks/bench_unlearn.py --out benchmarks/results/unlearn_h200x2 --budget-s 560 --modes full
    python benchmarks/bench_unlearn.py --tiny --out /tmp/unlearn_cpu --budget-s 300   # CPU smoke

Writes <out>/unlearn_cost.json and <out>/unlearn_cost.md and prints the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import common  # noqa: E402  (sets the repo path and the GPU allocator flags before jax starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from timerome_jax.baselines import losses as L  # noqa: E402
from timerome_jax.baselines import lora  # noqa: E402
from timerome_jax.baselines import registry  # noqa: E402
from timerome_jax.baselines import train as T  # noqa: E402
from timerome_jax.io import write_json, write_text  # noqa: E402

METHODS = ("ga", "gd", "npo", "simnpo", "adaptive_rmu", "mdu")


def qa_rows(cfg, n: int, T_len: int, seed: int) -> L.QA:
    """n random rows of T_len tokens: the first half prompt, the second half answer."""
    rng = np.random.default_rng(seed)
    toks = common.random_tokens(rng, (n, T_len), cfg)
    am = np.zeros((n, T_len), bool)
    am[:, T_len // 2:] = True
    return L.QA(jnp.asarray(toks), jnp.asarray(am), jnp.ones((n, T_len), bool))


def fsdp_sharding(mesh: Mesh, a):
    """Split `a` along its largest axis divisible by the mesh size (replicated if none)."""
    n = mesh.devices.size
    axes = [i for i in np.argsort(a.shape)[::-1] if a.shape[i] % n == 0 and a.shape[i] >= n]
    if not axes:
        return NamedSharding(mesh, P())
    spec = [None] * a.ndim
    spec[int(axes[0])] = "fsdp"
    return NamedSharding(mesh, P(*spec))


def child(a) -> dict:
    cfg = common.model_config(a.tiny)
    n_dev = len(jax.devices())
    params = common.init_params(jax.random.PRNGKey(0), cfg, common.default_init_std(a.tiny))
    hp = dict(steps=a.steps_used, batch_size=a.batch_size, retain_batch_size=a.batch_size, lora_rank=a.lora_rank)
    if a.mode == "full" and a.method != "adaptive_rmu":
        hp.update(mode="full", targets=lora.MATRICES)
    tcfg = registry.train_config(a.method, cfg, **hp)
    trainable, base = T.split_trainable(params, jax.random.PRNGKey(1), tcfg)
    fq, rq = qa_rows(cfg, a.rows, a.seq_len, 0), qa_rows(cfg, a.rows, a.seq_len, 1)
    mesh = None
    if a.mode == "full" and n_dev > 1:
        mesh = Mesh(np.array(jax.devices()), ("fsdp",))
        put = lambda t: jax.tree.map(lambda x: jax.device_put(x, fsdp_sharding(mesh, x)), t)  # noqa: E731
        params = put(params)
        trainable = put(trainable)
        base = params
    opt_state = jax.jit(T.optimizer(tcfg).init)(trainable)
    layer_mask = T.layer_mask_for(trainable, cfg.n_layers, tcfg)
    u = T.rmu_direction(0, cfg.d_model)
    B = min(a.batch_size, a.rows)

    def batch(qa, s):
        idx = np.arange(s * B, s * B + B) % a.rows
        b = jax.tree.map(lambda x: x[idx], qa)
        if mesh is not None and B % n_dev == 0:
            b = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp"))), b)
        return b

    times = []
    state = (trainable, opt_state)
    for s in range(a.repeats + 1):
        bf, br = batch(fq, s), batch(rq, s)
        t0 = time.perf_counter()
        tr_, os_, aux = T.train_step(state[0], state[1], base, params, bf, br, jax.random.PRNGKey(s), u, layer_mask,
                                     cfg=cfg, tcfg=tcfg)
        jax.block_until_ready((tr_, os_, aux))
        times.append(time.perf_counter() - t0)
        state = (tr_, os_)
    step_s = statistics.median(times[1:])
    return {"method": a.method, "mode": "lora" if tcfg.mode == "lora" else "full", "devices": n_dev,
            "fsdp": mesh is not None, "compile_s": times[0], "step_s": step_s, "steps_used": a.steps_used,
            "steps_used_s": step_s * a.steps_used, "peak_bytes": common.jax_peak_bytes(),
            "param_bytes": common.tree_bytes(params), "trainable_bytes": common.tree_bytes(trainable),
            "batch_rows": B, "seq_len": a.seq_len, "loss": float(aux["loss"]), "shape": common.shape_info(cfg)}


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=False, default="benchmarks/results/unlearn")
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--tiny", action="store_true", help="2-layer d=64 model (CPU smoke)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--full-methods", nargs="+", default=["npo", "ga", "simnpo", "mdu", "gd", "adaptive_rmu"],
                    choices=METHODS, help="methods also run full-parameter on 2 GPUs (in this order)")
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=("lora", "full"),
                    help="lora: one GPU; full: FSDP over two GPUs")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="forget (and retain) rows per step")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--steps-used", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--install-json", default=None, help="bench_install.py record to set beside")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        a.method, a.mode = a.child
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    t0 = time.perf_counter()
    n_gpu = len([d for d in jax.devices() if d.platform == "gpu"])
    jobs = [(m, "lora", "0") for m in a.methods] if "lora" in a.modes else []
    jobs += [(m, "full", "0,1") for m in a.full_methods] if "full" in a.modes else []
    results, skipped = [], []
    for m, mode, devs in jobs:
        left = a.budget_s - (time.perf_counter() - t0)
        if left < 30:
            skipped.append({"method": m, "mode": mode, "why": "budget"})
            continue
        env = dict(os.environ)
        if n_gpu:
            if mode == "full" and n_gpu < 2:
                skipped.append({"method": m, "mode": mode, "why": f"{n_gpu} GPU(s); FSDP needs 2"})
                continue
            env["CUDA_VISIBLE_DEVICES"] = devs
        elif mode == "full":  # CPU smoke: two host devices stand in for two GPUs
            env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        cmd = [sys.executable, os.path.abspath(__file__), "--child", m, mode, "--rows", str(a.rows), "--seq-len",
               str(a.seq_len), "--batch-size", str(a.batch_size), "--lora-rank", str(a.lora_rank), "--steps-used",
               str(a.steps_used), "--repeats", str(a.repeats)] + (["--tiny"] if a.tiny else [])
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            skipped.append({"method": m, "mode": mode, "why": "timed out (budget)"})
            continue
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode or line is None:
            skipped.append({"method": m, "mode": mode, "why": f"exit {p.returncode}: {p.stderr[-800:]}"})
            continue
        results.append(json.loads(line[len("RESULT "):]))
        print(f"{m:13s} {mode:4s} step {results[-1]['step_s']:.3f}s compile {results[-1]['compile_s']:.1f}s peak "
              f"{(results[-1]['peak_bytes'] or 0) / 2**30:.2f} GiB", flush=True)
    install = None
    if a.install_json and os.path.exists(a.install_json):
        with open(a.install_json) as f:
            install = json.load(f)
    summary = {"env": common.env_info(), "tiny": a.tiny, "rows": a.rows, "seq_len": a.seq_len,
               "batch_size": a.batch_size, "lora_rank": a.lora_rank, "steps_used": a.steps_used,
               "results": results, "skipped": skipped, "timerome_install": install,
               "total_s": time.perf_counter() - t0}
    write_json(os.path.join(a.out, "unlearn_cost.json"), summary)
    card = summary["env"].get("jax_device_kind") or "cpu"
    lines = [f"# Unlearning baselines: cost per step ({'tiny CPU smoke' if a.tiny else 'LLaDA-8B shape, random bf16'}; "
             f"{card})", "", f"{a.rows} forget + {a.rows} retain rows of {a.seq_len} tokens, {a.batch_size} + "
             f"{a.batch_size} rows per step, LoRA r {a.lora_rank}; steps used = {a.steps_used}.", "",
             "| method | mode | devices | step s | compile s | time for steps used (s) | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['mode']}{' (FSDP)' if r['fsdp'] else ''} | {r['devices']} | "
                     f"{r['step_s']:.3f} | {r['compile_s']:.1f} | {r['steps_used_s']:.1f} | "
                     f"{_gib(r['peak_bytes'])} |")
    for s in skipped:
        lines.append(f"| {s['method']} | {s['mode']} | – | skipped: {s['why'][:120]} | | | |")
    write_text(os.path.join(a.out, "unlearn_cost.md"), "\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "env"}, default=str))


if __name__ == "__main__":
    main()
