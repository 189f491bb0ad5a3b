"""`timerome validate` at the LLaDA-8B shape: a random bf16 checkpoint in the real HF layout with the
official modeling files beside it, checked against the library on the GPU.

    python benchmarks/validate_8b.py --out $OUT --official-dir .official/llada      # H200, ~2-3 min
    python benchmarks/validate_8b.py --out /tmp/r --official-dir DIR --tiny         # CPU, seconds

The checkpoint (random weights, `hf_weights.save_pretrained`, about 16 GB at 8B) is written to --work
(default: a temporary folder under /dev/shm when it exists and has room for the checkpoint with the
host memory to spare, since writing and reading 16 GB on disk is most of the run; else under the
system's temporary folder; removed afterwards); the official `modeling_llada.py` and
`configuration_llada.py` are copied in and config.json gets the `auto_map` a real LLaDA folder has.
Then `validate.validate` loads it in the library and through transformers' remote code and compares
logits and every hidden state, unpadded and left-padded. Writes OUT/validate_8b.json (+ .md) and
exits 1 when a tolerance is exceeded. The JSON keeps each phase's seconds under `phases_s`: init
(random weights on the device), checkpoint_write, library_load (`hf_weights.load_pretrained`),
torch_load (`validate.torch_model`: transformers' remote code, to the device), compare (the rest of
`validate.validate`: the layout change, both forwards on both cases, the errors), and the folder used.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax  # noqa: E402

from timerome_jax.backbone import hf_weights  # noqa: E402
from timerome_jax.backbone import validate as V  # noqa: E402
from timerome_jax.io import write_json, write_text  # noqa: E402

AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}


def work_folder(need_bytes: int, shm: str = "/dev/shm") -> tuple[str, str]:
    """(a new temporary folder for a checkpoint of need_bytes, where): under `shm` when it is a
    folder with 1.2 x need_bytes free and the host has 3 x need_bytes available (the tmpfs copy, the
    torch model loaded on the host and the library's host staging), else the system's temporary folder."""
    try:
        st = os.statvfs(shm)
        free = st.f_bavail * st.f_frsize
        avail = _mem_available()
        if os.path.isdir(shm) and free >= 1.2 * need_bytes and (avail is None or avail >= 3 * need_bytes):
            return tempfile.mkdtemp(prefix="validate_8b_", dir=shm), f"{shm} (tmpfs, {free / 2**30:.0f} GiB free)"
        why = (f"{shm}: {free / 2**30:.1f} GiB free, host "
               f"{None if avail is None else round(avail / 2**30, 1)} GiB available")
    except OSError as e:
        why = f"{shm}: {e}"
    return tempfile.mkdtemp(prefix="validate_8b_"), f"{tempfile.gettempdir()} (not {why})"


def _mem_available():
    """Bytes of host memory available (/proc/meminfo MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@contextlib.contextmanager
def timed(module, name: str, phases: dict, key: str):
    """Within the block, calls of module.name add their seconds to phases[key] (the attribute is
    restored afterwards): how `validate.validate`'s own loading steps are timed from outside it."""
    fn = getattr(module, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - t0

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, fn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--official-dir", required=True, help="folder with modeling_llada.py + configuration_llada.py")
    ap.add_argument("--work", default=None, help="where to write the checkpoint (default: a temporary folder under "
                    "/dev/shm when it has room, else under the system's temporary folder)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default="unpadded,padded", help="comma list of unpadded, padded (default both)")
    args = ap.parse_args(argv)
    missing = [f for f in C.OFFICIAL_FILES if not os.path.isfile(os.path.join(args.official_dir, f))]
    if missing:
        print(f"error: --official-dir {args.official_dir!r} lacks {missing}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    dtype = args.dtype or ("bfloat16" if C.on_gpu() else "float32")
    cfg = C.model_config(args.tiny, dtype=dtype)
    phases = {}
    t0 = time.perf_counter()
    params = C.block(C.init_params(jax.random.key(args.seed), cfg, C.default_init_std(args.tiny)))
    phases["init"] = time.perf_counter() - t0
    need = C.param_count(params) * (2 if dtype == "bfloat16" else 4)
    if args.work:
        work, where = args.work, "--work"
        os.makedirs(work, exist_ok=True)
    else:
        work, where = work_folder(need)
    print(f"[validate_8b] checkpoint of {need / 2**30:.2f} GiB in {work} ({where})", flush=True)
    try:
        t0 = time.perf_counter()
        hf_weights.save_pretrained(params, cfg, work, dtype=dtype)
        del params
        for f in C.OFFICIAL_FILES:
            shutil.copyfile(os.path.join(args.official_dir, f), os.path.join(work, f))
        with open(os.path.join(work, "config.json")) as fh:
            conf = json.load(fh)
        conf["auto_map"] = AUTO_MAP
        write_json(os.path.join(work, "config.json"), conf)
        phases["checkpoint_write"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with timed(hf_weights, "load_pretrained", phases, "library_load"), \
                timed(V, "torch_model", phases, "torch_load"):
            report = V.validate(work, dtype, tol=args.tol, impl="remote",
                                cases=tuple(c.strip() for c in args.cases.split(",") if c.strip()))
        report["validate_s"] = time.perf_counter() - t0
        phases["compare"] = report["validate_s"] - phases.get("library_load", 0.0) - phases.get("torch_load", 0.0)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report.update({"status": "ok" if report["passed"] else "failed (tolerance exceeded)", "errors": {},
                   "checkpoint_write_s": phases["checkpoint_write"], "phases_s": phases,
                   "checkpoint_bytes": need, "checkpoint_folder": where, "random_weights": True,
                   "env": C.env_info(), "official_dir": os.path.abspath(args.official_dir)})
    write_json(os.path.join(args.out, "validate_8b.json"), report)
    lines = V.summary_lines(report)
    lines.append("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + f"; checkpoint in {where}")
    write_text(os.path.join(args.out, "validate_8b.md"), "\n".join(["# timerome validate, LLaDA-8B shape", ""]
                                                                    + [f"    {x}" for x in lines]) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
