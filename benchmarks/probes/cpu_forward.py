"""CPU speed of the packaged default model: one forward of a 64 x 128-token batch (the size bar of
the default models), compile and steady state apart, median of `--repeats` timed calls, each of
`--rounds` separate rounds (this machine is shared, so rounds differ).

    python benchmarks/probes/cpu_forward.py --out /tmp/cpu_forward.json
"""
import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402

from timerome_jax.backbone.checkpoint import load_model  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402
from timerome_jax.backbone.model import forward  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    params, cfg, _ = load_model(a.model)
    x = jax.random.randint(jax.random.key(0), (64, 128), 2, cfg.vocab_size)
    f = jax.jit(lambda p, t: forward(p, t, cfg))
    t0 = time.perf_counter()
    f(params, x).block_until_ready()
    compile_s = time.perf_counter() - t0
    rounds = []
    for _ in range(a.rounds):
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            f(params, x).block_until_ready()
            ts.append(time.perf_counter() - t)
        rounds.append({"median_s": float(np.median(ts)), "min_s": float(min(ts)), "times_s": ts})
    res = {"model": a.model, "batch": [64, 128], "compile_s": compile_s, "rounds": rounds,
           "cpu": platform.processor() or platform.machine(), "n_cpus": os.cpu_count(), "jax": jax.__version__,
           "load_average_at_end": os.getloadavg()}
    write_json(a.out, res)
    print({"compile_s": round(compile_s, 2), "medians": [round(r["median_s"], 3) for r in rounds],
           "mins": [round(r["min_s"], 3) for r in rounds]})


if __name__ == "__main__":
    main()
