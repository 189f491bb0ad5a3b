"""Shared pieces of the GPU benchmark suite (JAX vs PyTorch hooks at the LLaDA-8B shape): shapes, weights, FLOP counts, timing, records.

Every figure script (bench_ceiling, bench_tie, bench_install, bench_generate) imports this first:
it puts the repo root on sys.path and turns JAX's GPU memory preallocation off (before JAX starts),
because the PyTorch reference runs in the same process and needs its own share of the card.

Conventions used by every figure:
- Weights: random, made ON the device by one jitted init (nothing is downloaded). PyTorch sees the
  very same weights through DLPack (zero-copy views of the JAX buffers, transposed where torch's
  Linear stores [out, in]); if DLPack fails the weights are copied through the host (recorded).
- Compile vs steady state: every JAX compilation is heard through `jax.monitoring`
  (`CompileWatch`). A timed call during which XLA compiled is a *compile run* (reported apart, with
  the compile seconds); steady state is the median of calls that compiled nothing.
- FLOPs: 2 x (matmul parameters) x tokens per forward, + attention 4 T^2 (H hd) per layer per
  sequence, + the LM head 2 D V per token when the logits are computed. The floor of a figure is
  max(FLOPs / matmul ceiling, weight bytes read / read bandwidth), ceilings measured in the same run
  by bench_ceiling (the JAX numbers).
- Records: one JSON per figure, rewritten (atomically) after every section, so a crash keeps what
  was measured before it.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import functools
import glob
import gzip
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from typing import Callable, Optional

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from timerome_jax.backbone import hf_config, hf_weights, validate  # noqa: E402
from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.backbone.config import ModelConfig, llada_8b  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402

# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def model_config(tiny: bool, dtype: Optional[str] = None, attn: Optional[str] = None) -> ModelConfig:
    """LLaDA-8B shape (bf16, cuDNN attention on GPU) or, with `tiny`, a 2-layer d=64 model that runs
    the same code on a CPU in seconds (fp32, XLA attention)."""
    if tiny:
        return ModelConfig(family="llada", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                           head_dim=16, d_ff=128, mask_token_id=255, pad_token_id=0, eos_token_id=1,
                           max_seq_len=512, dtype=dtype or "float32", attn_impl=attn or "xla")
    return llada_8b().replace(dtype=dtype or "bfloat16", attn_impl=attn or ("cudnn" if on_gpu() else "xla"))


def default_init_std(tiny: bool) -> float:
    # tiny: large enough that the TIE values are far from zero (so agreement checks mean something)
    return 0.25 if tiny else 0.02


def special_ids(cfg: ModelConfig) -> set:
    return {cfg.mask_token_id, cfg.pad_token_id, cfg.eos_token_id}


def random_tokens(rng: np.random.Generator, shape, cfg: ModelConfig) -> np.ndarray:
    """Random ordinary token ids (never mask/pad/eos, never 0/1)."""
    x = rng.integers(2, cfg.vocab_size, size=shape).astype(np.int32)
    bad = np.isin(x, list(special_ids(cfg)))
    while bad.any():
        x[bad] = rng.integers(2, cfg.vocab_size, size=int(bad.sum()))
        bad = np.isin(x, list(special_ids(cfg)))
    return x


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------


def init_params(key, cfg: ModelConfig, std: float):
    """Random params in cfg.dtype made inside one jit on the device (no host copies): matrices
    N(0, std^2), norm weights 1."""
    shapes = model_lib.param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    dt = model_lib.cdtype(cfg)

    def make(key):
        keys = jax.random.split(key, len(flat))
        leaves = []
        for k, (path, shp) in zip(keys, flat):
            if "norm" in jax.tree_util.keystr(path):
                leaves.append(jnp.ones(shp, dt))
            else:
                leaves.append(jax.random.normal(k, shp, dt) * jnp.asarray(std, dt))
        return jax.tree.unflatten(treedef, leaves)

    return jax.block_until_ready(jax.jit(make)(key))


def torch_device():
    import torch

    return torch.device("cuda" if on_gpu() and torch.cuda.is_available() else "cpu")


def _to_torch(x, device):
    import torch

    try:
        t = torch.from_dlpack(x)
        if t.device.type != torch.device(device).type:
            raise RuntimeError(f"DLPack gave a {t.device} tensor, wanted {device}")
        return t, "dlpack"
    except Exception:  # noqa: BLE001 - fall back to a host copy, recorded by the caller
        a = np.asarray(x)
        if a.dtype.name == "bfloat16":
            t = torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device), "host_copy"


def torch_model(params, cfg: ModelConfig):
    """The torch_ref LLaDAModelLM holding the SAME weights as `params` (DLPack views; HF key map
    of `timerome_jax.backbone.hf_weights`). Returns (model in eval mode, how the weights were moved)."""
    import torch

    from timerome_jax.torch_ref.llada import LLaDAModelLM

    dev = torch_device()
    if dev.type == "cpu":
        # CPU runs are the tiny smoke test only. Seen on a busy 2-core CPU: after JAX has run,
        # torch's default intra-op pool made tiny matmuls ~100x slower; one thread avoids it.
        torch.set_num_threads(1)
    tdt = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    m = LLaDAModelLM(hf_config.hf_config_dict(cfg, dtype=cfg.dtype), device="meta", dtype=tdt)
    sd, how = shared_state_dict(params, cfg, dev)
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval(), how


def shared_state_dict(params, cfg: ModelConfig, dev):
    """The HF-layout state dict of `params` (either layout) as torch views of the JAX arrays (DLPack;
    host copy when DLPack cannot): (state dict, how the weights were moved)."""
    leaves, how = {}, set()
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = tuple(getattr(p, "key", getattr(p, "name", getattr(p, "idx", None))) for p in path)
        leaves[key], h = _to_torch(x, dev)
        how.add(h)
    unstacked = model_lib.is_unstacked(params)
    sd = {}
    for name, (path, idx, transpose) in hf_weights.key_map(cfg).items():
        cols = None
        if unstacked and path[0] == "layers":  # layer idx[0]'s own array, then the rest of idx
            fused = model_lib.fused_columns(params["layers"][idx[0]])
            if path[1] in fused:  # a part of a fused matrix: its columns
                f, a, b = fused[path[1]]
                path, cols = (path[0], f) + tuple(path[2:]), (a, b)
            path, idx = ("layers", idx[0]) + tuple(path[1:]), idx[1:]
        t = leaves[tuple(path)]
        for i in idx:
            t = t[i]
        if cols is not None:
            t = t[:, cols[0]:cols[1]]
        sd[name] = t.T if transpose else t  # a view: torch's matmuls take transposed/sliced operands as is
    return sd, "+".join(sorted(how))


OFFICIAL_FILES = ("modeling_llada.py", "configuration_llada.py")


class OfficialCodeMissing(FileNotFoundError):
    """--official-dir is not a folder holding the official LLaDA modeling files."""


def official_model(official_dir: str, params, cfg: ModelConfig):
    """The official LLaDA PyTorch code (official_dir/modeling_llada.py and configuration_llada.py,
    as a real LLaDA checkpoint's config.json auto_map names them) holding the SAME weights as
    `params` (DLPack views). Returns (model in eval mode on the benchmark device, how the weights
    were moved). Raises OfficialCodeMissing with what to do when the files are absent."""
    import torch
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module


    missing = [f for f in OFFICIAL_FILES if not os.path.isfile(os.path.join(official_dir or "", f))]
    if not official_dir or missing:
        raise OfficialCodeMissing(
            f"--official-dir {official_dir!r} lacks {missing or list(OFFICIAL_FILES)}: put the files of a LLaDA "
            "checkpoint (e.g. GSAI-ML/LLaDA-8B-Instruct: modeling_llada.py, configuration_llada.py) in an ignored "
            "folder such as .official/llada/ and pass it (and carry it to the device)")
    path = os.path.abspath(official_dir)
    conf_cls = get_class_from_dynamic_module("configuration_llada.LLaDAConfig", path)
    model_cls = get_class_from_dynamic_module("modeling_llada.LLaDAModelLM", path)
    d = hf_config.hf_config_dict(cfg, dtype=cfg.dtype)
    d = {k: v for k, v in d.items() if k not in ("auto_map", "architectures", "model_type")}
    d["init_device"] = "meta"  # the official code's own no-allocation path; the weights come below
    dev = torch_device()
    shims = validate.shim_remote_code(model_cls, "cuda" if dev.type == "cuda" else "cpu")
    conf = conf_cls(**d)
    shims += validate.shim_remote_config(conf)  # transformers 5 configs have no use_cache
    if shims:
        print(f"[official] transformers {transformers.__version__} shims: {', '.join(shims)}", flush=True)
    m = model_cls(conf)
    sd, how = shared_state_dict(params, cfg, dev)
    m.load_state_dict(sd, strict=True, assign=True)
    return m.to(dev).eval(), how


# ------------------------------------------------------------------------------------------------
# FLOPs and bytes
# ------------------------------------------------------------------------------------------------


def layer_matmul_params(cfg: ModelConfig) -> int:
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return cfg.d_model * (qd + 2 * kvd) + qd * cfg.d_model + 3 * cfg.d_model * cfg.d_ff


def forward_flops(cfg: ModelConfig, rows: int, T: int, layers: Optional[int] = None, head: bool = True) -> int:
    """FLOPs of `rows` forwards of length T through `layers` layers (default all) [+ LM head]."""
    L = cfg.n_layers if layers is None else layers
    tokens = rows * T
    f = 2 * layer_matmul_params(cfg) * L * tokens
    f += 4 * T * T * cfg.n_heads * cfg.head_dim * L * rows  # QK^T and PV
    if head:
        f += 2 * cfg.d_model * cfg.vocab_size * tokens
    return int(f)


def weight_bytes(cfg: ModelConfig, layers: Optional[int] = None, head: bool = True) -> int:
    """Bytes of the weights one forward must read (matmul weights of `layers` layers [+ LM head];
    the embedding is only gathered, norms are negligible)."""
    L = cfg.n_layers if layers is None else layers
    itemsize = 2 if cfg.dtype == "bfloat16" else 4
    n = layer_matmul_params(cfg) * L + (cfg.d_model * cfg.vocab_size if head else 0)
    return int(n * itemsize)


def param_count(params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


def tree_bytes(tree) -> int:
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def floor(flops: float, bytes_: float, ceiling: dict) -> dict:
    """Floor of a figure: the larger of FLOPs / matmul rate and bytes / read bandwidth."""
    t_f = flops / ceiling["matmul_flops_per_s"]
    t_b = bytes_ / ceiling["bytes_per_s"] if ceiling.get("bytes_per_s") else 0.0
    return {"flops": float(flops), "bytes": float(bytes_), "flop_time_s": t_f, "byte_time_s": t_b,
            "floor_s": max(t_f, t_b), "bound": "compute" if t_f >= t_b else "memory"}


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


class CompileWatch:
    """Hears every JAX compilation (jax.monitoring duration events), so a timed region can say
    whether XLA compiled inside it and for how long."""

    _instance = None
    KEYS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration")

    def __init__(self):
        self.events = []
        jax.monitoring.register_event_duration_secs_listener(self._hear)

    @classmethod
    def get(cls) -> "CompileWatch":
        if cls._instance is None:
            cls._instance = CompileWatch()
        return cls._instance

    def _hear(self, name, secs, **_):
        if name in self.KEYS:
            self.events.append((name, float(secs), threading.get_ident()))

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int, this_thread: bool = False) -> tuple[int, float]:
        """(number of backend compilations, seconds spent tracing+lowering+compiling) since mark;
        this_thread: only those of the calling thread (when other threads compile meanwhile)."""
        me = threading.get_ident()
        ev = [(k, s) for k, s, t in self.events[mark:] if not this_thread or t == me]
        n = sum(1 for k, _ in ev if k == self.KEYS[0])
        return n, sum(s for _, s in ev)


def block(x):
    return jax.block_until_ready(x)


def torch_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable, sync: Callable, watch: "CompileWatch") -> tuple:
    """(fn(), wall seconds including sync, XLA compilations during the call, their seconds)."""
    mark = watch.mark()
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    dt = time.perf_counter() - t0
    return (out, dt) + watch.since(mark)


def measure(fn: Callable, *, want: int = 5, deadline: Optional[float] = None, sync: Callable = block,
            allow_estimate: bool = False, max_compile_runs: int = 2) -> dict:
    """Call fn() until `want` steady runs (no XLA compilation inside) are done.

    Past `deadline` (time.perf_counter()) it stops once it has one steady run, or, with
    `allow_estimate`, as soon as it has a compile run (steady then estimated as wall - compile
    seconds, flagged). Returns steady_s (median), times_s, n_steady, compile runs (wall and compile
    seconds), and the last output (key "out", dropped before saving).
    """
    watch = CompileWatch.get()
    steady, comp = [], []
    out = None
    while True:
        out, dt, n_comp, secs = _timed(fn, sync, watch)
        if n_comp:
            comp.append({"wall_s": dt, "compile_s": secs, "n_compilations": n_comp})
        else:
            steady.append(dt)
        late = deadline is not None and time.perf_counter() > deadline
        if len(steady) >= want:
            break
        if late and (steady or (allow_estimate and comp)):
            break
        if len(comp) > max_compile_runs:
            break  # recompiling on every call: report it rather than loop
    res = {"n_steady": len(steady), "times_s": steady, "steady_s": statistics.median(steady) if steady else None,
           "want": want, "compile_runs": comp, "out": out}
    if not steady and comp:
        res["steady_s"] = max(comp[-1]["wall_s"] - comp[-1]["compile_s"], 0.0)
        res["steady_estimated_from_compile_run"] = True
    if len(comp) > max_compile_runs:
        res["error"] = f"XLA compiled in each of {len(comp)} calls: the program is not reused"
    return res


def measure_rounds(fns: dict, *, want: int = 5, deadline: Optional[float] = None,
                   sync: Callable = block, at_least: int = 1, gap_s: float = 0.0,
                   shuffle_seed: Optional[int] = None) -> tuple[dict, list]:
    """Time the callables of `fns` (name -> fn) in rounds, each round calling every one in turn
    (a, b, c, a, b, c, ...), so all get the same number of runs and drifts (clocks, temperature)
    hit all alike; for small differences such as an edit's overhead. Stops after `want` rounds in
    which every call was steady (no XLA compilation inside), or past `deadline` once there are
    `at_least` (capped at want).
    gap_s: idle seconds before each call, untimed (back-to-back GPU calls can slow periodically;
    see docs/performance.md). shuffle_seed: call each round's functions in an order drawn from this
    seed, so that a disturbance with the period of a round does not always hit the same one.
    Returns ({name: result as `measure` gives, marked interleaved}, [{name: seconds} per steady round])."""
    rs = {k: {"times": [], "comp": [], "out": None} for k in fns}
    rounds = []
    watch = CompileWatch.get()
    names = list(fns)
    order_rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    for _ in range(max(want, 1) + 2):  # + 2: room for calls that compiled
        this = {}
        order = names if order_rng is None else [names[i] for i in order_rng.permutation(len(names))]
        for k in order:
            f, r = fns[k], rs[k]
            if gap_s > 0:
                time.sleep(gap_s)
            r["out"], dt, n_comp, secs = _timed(f, sync, watch)
            if n_comp:
                r["comp"].append({"wall_s": dt, "compile_s": secs, "n_compilations": n_comp})
            else:
                r["times"].append(dt)
                this[k] = dt
        if len(this) == len(fns):
            rounds.append(this)
        done = min(len(r["times"]) for r in rs.values())
        if done >= want or (deadline is not None and time.perf_counter() > deadline
                            and done >= max(1, min(at_least, want))):
            break

    def pack(r):
        t = r["times"]
        return {"n_steady": len(t), "times_s": t, "steady_s": statistics.median(t) if t else None, "want": want,
                "compile_runs": r["comp"], "out": r["out"], "interleaved": True}

    return {k: pack(r) for k, r in rs.items()}, rounds


def round_ratios(rounds: list, num: str, den: str) -> list:
    """Per-round ratios t_num / t_den of `measure_rounds`' steady rounds."""
    return [r[num] / r[den] for r in rounds]


def overhead_pct(res_base: dict, res_other: dict, ratios: list) -> dict:
    """How much slower `other` is than `base`, in %: from the medians ("of_medians") and the median
    of the per-round ratios ("paired_median"; None without a steady round), with the round count."""
    return {"of_medians": 100 * (res_other["steady_s"] / res_base["steady_s"] - 1),
            "paired_median": 100 * (float(np.median(ratios)) - 1) if ratios else None, "n_pairs": len(ratios)}


def measure_pair(fa: Callable, fb: Callable, *, want: int = 5, deadline: Optional[float] = None,
                 sync: Callable = block, gap_s: float = 0.0,
                 shuffle_seed: Optional[int] = None) -> tuple[dict, dict, list]:
    """`measure_rounds` of two: fa and fb alternately (a, b, a, b, ...; gap_s and shuffle_seed as there).
    Returns (result of fa, result of fb, per-pair ratios t_b / t_a over steady pairs)."""
    res, rounds = measure_rounds({"a": fa, "b": fb}, want=want, deadline=deadline, sync=sync, gap_s=gap_s,
                                 shuffle_seed=shuffle_seed)
    return res["a"], res["b"], round_ratios(rounds, "b", "a")


def strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "out"}


class Deadline:
    """A figure's soft time budget: optional repeats stop once it has passed."""

    def __init__(self, budget_s: Optional[float]):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.at = None if budget_s is None else self.t0 + float(budget_s)

    def half_of_rest(self) -> Optional[float]:
        """A deadline half-way through what is left (the first framework's share of a figure)."""
        return None if self.at is None else time.perf_counter() + max(self.left(), 0.0) / 2

    def at_least(self, seconds: float) -> Optional[float]:
        """A deadline no earlier than `seconds` from now (the second framework keeps a fair share)."""
        return None if self.at is None else max(self.at, time.perf_counter() + seconds)

    def left(self) -> float:
        return float("inf") if self.at is None else self.at - time.perf_counter()


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------


def jax_memory() -> dict:
    """Peak / in-use bytes per local device (None on CPU, which keeps no stats)."""
    out = {}
    for d in jax.local_devices():
        s = d.memory_stats()
        if s:
            out[str(d.id)] = {"peak_bytes_in_use": int(s.get("peak_bytes_in_use", 0)),
                              "bytes_in_use": int(s.get("bytes_in_use", 0)),
                              "bytes_limit": int(s.get("bytes_limit", 0))}
    return out or None


def jax_peak_bytes() -> Optional[int]:
    m = jax_memory()
    return None if m is None else max(v["peak_bytes_in_use"] for v in m.values())


def torch_reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def torch_peak_bytes() -> Optional[int]:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def torch_allocated() -> Optional[int]:
    import torch

    return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None


def torch_release():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def memory_analysis(compiled) -> Optional[dict]:
    """Sizes XLA assigned to a compiled program (bytes), or None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "peak_memory_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


# ------------------------------------------------------------------------------------------------
# environment and records
# ------------------------------------------------------------------------------------------------


def env_info() -> dict:
    """Card, software versions and the knobs of the environment that change timings (the slow part,
    an nvidia-smi call and a torch import, is looked up once per process)."""
    return {**_env_static(), "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


@functools.lru_cache(maxsize=None)
def _env_static() -> dict:
    import jaxlib

    d = jax.devices()[0]
    info = {"jax_device_kind": d.device_kind, "jax_platform": d.platform, "n_devices": jax.device_count(),
            "n_local_devices": jax.local_device_count(), "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "numpy_version": np.__version__,
            "python": platform.python_version(), "host": platform.node(), "cpu_count": os.cpu_count(),
            "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                     "XLA_PYTHON_CLIENT_MEM_FRACTION", "PYTORCH_CUDA_ALLOC_CONF",
                                                     "CUDA_VISIBLE_DEVICES")}}
    try:
        import torch

        info["torch_version"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["torch_device_name"] = torch.cuda.get_device_name(0)
            info["torch_cudnn"] = torch.backends.cudnn.version()
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:  # the version only: importing transformers costs seconds
        from importlib.metadata import version

        info["transformers_version"] = version("transformers")
    except Exception:  # noqa: BLE001
        info["transformers_version"] = None
    try:
        import subprocess

        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if q.returncode == 0:
            info["nvidia_smi"] = q.stdout.strip().splitlines()
    except Exception:  # noqa: BLE001
        pass
    return info


class Record:
    """One figure's JSON record, rewritten atomically after every section."""

    def __init__(self, path: str, figure: str, title: str, args: argparse.Namespace):
        self.path = path
        self.data = {"figure": figure, "title": title, "status": "running", "env": env_info(),
                     "knobs": {k: v for k, v in sorted(vars(args).items())}, "errors": {}}
        self.save()

    def __setitem__(self, k, v):
        self.data[k] = v

    def __getitem__(self, k):
        return self.data[k]

    def save(self):
        write_json(self.path, self.data)

    @contextlib.contextmanager
    def section(self, name: str):
        """Run a section; on an exception record it (with traceback) and carry on with the next."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:  # noqa: BLE001
            self.data["errors"][name] = {"error": f"{type(e).__name__}: {e}"[:4000],
                                         "traceback": traceback.format_exc()[-6000:]}
            print(f"[{self.data['figure']}] section {name} failed: {type(e).__name__}: {str(e)[:500]}",
                  file=sys.stderr, flush=True)
        finally:
            self.data.setdefault("section_wall_s", {})[name] = time.perf_counter() - t0
            self.save()

    def finish(self):
        self.data["status"] = "ok" if not self.data["errors"] else "partial"
        self.save()
        return self.data


def default_sizes(tiny: bool) -> tuple[int, int, int]:
    """(matmul size, matmuls per timed call, copy bytes): 8192, 10, 2 GiB; tiny 512, 4, 16 MiB."""
    return (512, 4, 16 << 20) if tiny else (8192, 10, 2048 << 20)


def measure_jax(n: int, reps: int = 10, copy_bytes: int = 1 << 31, calls: int = 5) -> dict:
    """JAX bf16 matmul rate (FLOP/s), read bandwidth (bytes/s read) and copy bandwidth (bytes/s, read +
    written)."""
    ka, kb = jax.random.split(jax.random.key(1))
    a = (jax.random.normal(ka, (n, n), jnp.float32) / jnp.sqrt(n)).astype(jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)

    @jax.jit
    def chain(a, c):
        return jax.lax.fori_loop(0, reps, lambda i, c: jnp.dot(a, c, preferred_element_type=jnp.float32)
                                 .astype(jnp.bfloat16), c)

    out = {"n": n, "reps": reps}
    t0 = time.perf_counter()
    chain_c = chain.lower(a, b).compile()
    out["matmul_compile_s"] = time.perf_counter() - t0
    block(chain_c(a, b))
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        r = block(chain_c(a, b))
        ts.append((time.perf_counter() - t0) / reps)
    out["matmul_times_s"] = ts
    out["matmul_s"] = statistics.median(ts)
    out["matmul_flops_per_s"] = 2 * n ** 3 / out["matmul_s"]
    out["matmul_result_finite"] = bool(jnp.isfinite(r.astype(jnp.float32)).all())

    # both over a 2 GiB bf16 buffer, `reps` dependent passes in one jitted loop (one dispatch and one
    # wait for all of them, which at ~1 ms a pass would otherwise be a tenth of the time): read =
    # a float32 sum of the buffer (bytes read once: what streaming the weights is, the floors' bytes);
    # copy = y <- y + 1 (bytes read + written)
    m = copy_bytes // 2
    x = jax.random.normal(jax.random.key(2), (m,), jnp.bfloat16)
    one = jnp.bfloat16(1)
    # the factor (s * 0 + 1) ties each pass to the carry, so no pass is hoisted out of the loop
    read = jax.jit(lambda x: jax.lax.fori_loop(
        0, reps, lambda i, s: s + jnp.sum(x * (s * 0 + 1).astype(x.dtype), dtype=jnp.float32),
        jnp.float32(0))).lower(x).compile()
    copy = jax.jit(lambda x: jax.lax.fori_loop(0, reps, lambda i, y: y + one, x)).lower(x).compile()
    for name, prog, moved in (("read", read, 2 * m), ("copy", copy, 2 * m * 2)):
        block(prog(x))
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            block(prog(x))
            ts.append((time.perf_counter() - t0) / reps)
        out[f"{name}_bytes"] = moved
        out[f"{name}_times_s"] = ts
        out[f"{name}_bytes_per_s"] = moved / statistics.median(ts)
    return out


def load_ceiling(path: Optional[str], tiny: bool) -> dict:
    """The JAX ceilings of this run (bench_ceiling's JSON), or measured now when no file is given."""
    if path and os.path.exists(path):
        with open(path) as f:
            c = json.load(f)
        out = dict(c["ceiling"])
        out["source"] = os.path.abspath(path)
        return out
    n, reps, copy_bytes = default_sizes(tiny)
    return dict(ceiling_of(measure_jax(n, reps=reps, copy_bytes=copy_bytes)),
                source="measured in this process (common.measure_jax)")


def ceiling_of(jax_rates: dict) -> dict:
    """The floors' ceiling from `measure_jax`'s rates: the matmul rate and the READ bandwidth (a
    floor's bytes are weights read once)."""
    return {"matmul_flops_per_s": jax_rates["matmul_flops_per_s"], "bytes_per_s": jax_rates["read_bytes_per_s"],
            "bytes": "read", "from": "jax"}


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the JSON results")
    ap.add_argument("--tiny", action="store_true", help="tiny config: the same code on a CPU in seconds")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="compute dtype (default bfloat16; --tiny float32)")
    ap.add_argument("--attn", choices=("cudnn", "xla"), default=None,
                    help="JAX attention (default cudnn on GPU, xla on CPU; falls back to xla if cudnn fails)")
    ap.add_argument("--init-std", type=float, default=None, help="std of the random weights (0.02; --tiny 0.25)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer-unroll", type=int, default=1,
                    help="cfg.layer_unroll (1 = the library default rolled lax.scan; >= n_layers = a Python "
                         "loop over layers with static indices)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="soft budget of this figure: optional repeats stop once it is spent")
    ap.add_argument("--ceiling-json", default=None, help="bench_ceiling's JSON of this run (else measured now)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="wrap one steady-state JAX run in jax.profiler.trace(DIR)")
    ap.add_argument("--skip-torch", action="store_true", help="JAX only")
    return ap


def setup(args) -> tuple[ModelConfig, float]:
    cfg = model_config(args.tiny, args.dtype, args.attn).replace(layer_unroll=args.layer_unroll)
    std = args.init_std if args.init_std is not None else default_init_std(args.tiny)
    if cfg.dtype == "float32" and args.tiny:
        # exact fp32 on the CPU, so the JAX/torch agreement checks are tight
        jax.config.update("jax_default_matmul_precision", "highest")
    return cfg, std


def shape_info(cfg: ModelConfig, params=None) -> dict:
    d = {"config": cfg.to_dict()}
    if params is not None:
        d["param_count"] = param_count(params)
        d["param_bytes"] = tree_bytes(params)
    return d


@contextlib.contextmanager
def maybe_profile(path: Optional[str]):
    if not path:
        yield
        return
    os.makedirs(path, exist_ok=True)
    with jax.profiler.trace(path):
        yield


def kernel_summary(trace_dir: str, top: int = 15) -> dict:
    """Sum the complete events of the newest perfetto trace in trace_dir by name, for the device
    (GPU stream) processes when there are any, else for every process."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)[-1]
    with gzip.open(path) as f:
        tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    pnames = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M"
              and e.get("name") == "process_name"}
    dev = {p for p, n in pnames.items() if "/device:GPU" in n or "stream" in n.lower()}
    xs = [e for e in events if e.get("ph") == "X" and (not dev or e["pid"] in dev)]
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in xs:
        tot[e["name"]] += float(e.get("dur", 0.0))
        cnt[e["name"]] += 1
    span = (max(e["ts"] + e.get("dur", 0.0) for e in xs) - min(e["ts"] for e in xs)) if xs else 0.0
    return {"trace": path, "device_processes": sorted(pnames[p] for p in dev), "events": len(xs),
            "kernel_us_total": sum(tot.values()), "span_us": span,
            "top": [{"name": n[:120], "us": round(t, 1), "count": cnt[n]} for n, t in tot.most_common(top)]}


def traced_kernels(fn: Callable, trace_dir: str, top: int = 15) -> dict:
    """`kernel_summary` of one call of fn (blocked on its result) traced into trace_dir."""
    os.makedirs(trace_dir, exist_ok=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        block(fn())
    return kernel_summary(trace_dir, top)


def kernels_per_step(summary: dict, steps: int, top: Optional[int] = None) -> dict:
    """A `kernel_summary` of a whole generation divided by its steps: kernels, kernel and span
    microseconds per step, and the first `top` kernels (all when None) per step."""
    return {"kernels_per_step": summary["events"] / steps, "kernel_us_per_step": summary["kernel_us_total"] / steps,
            "span_us_per_step": summary["span_us"] / steps,
            "top_per_step": [{"name": k["name"], "us": round(k["us"] / steps, 2), "count": k["count"] / steps}
                             for k in summary["top"][:top]]}


def kernel_diff(base: dict, other: dict, top: int = 25) -> list:
    """The kernels whose summed time differs most between two `kernel_summary` results (pass a large
    `top` to both): [{name, us_base, us_other, count_base, count_other}], largest |change| first."""
    a = {k["name"]: k for k in base["top"]}
    b = {k["name"]: k for k in other["top"]}
    rows = [{"name": n, "us_base": a.get(n, {}).get("us", 0.0), "us_other": b.get(n, {}).get("us", 0.0),
             "count_base": a.get(n, {}).get("count", 0), "count_other": b.get(n, {}).get("count", 0)}
            for n in set(a) | set(b)]
    rows.sort(key=lambda d: (-abs(d["us_other"] - d["us_base"]), d["name"]))
    return rows[:top]


def with_attn_fallback(rec: Record, cfg: ModelConfig, run: Callable[[ModelConfig], None]):
    """run(cfg); if cuDNN attention fails, record the error and run again with XLA attention."""
    try:
        run(cfg)
        rec["attn_impl_used"] = cfg.attn_impl
        return cfg
    except Exception as e:  # noqa: BLE001
        if cfg.attn_impl != "cudnn":
            raise
        rec["cudnn_error"] = f"{type(e).__name__}: {e}"[:3000]
        rec.save()
        cfg = cfg.replace(attn_impl="xla")
        run(cfg)
        rec["attn_impl_used"] = cfg.attn_impl
        return cfg


def agreement(a, b) -> dict:
    """max |a-b|, ||a-b|| / ||b|| and max |b| over the entries finite in both (NaN = undefined)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    ok = np.isfinite(a) & np.isfinite(b)
    same_nan = bool(np.array_equal(np.isnan(a), np.isnan(b)))
    if not ok.any():
        return {"max_abs_diff": None, "rel_err": None, "max_abs_ref": None, "same_nan_pattern": same_nan}
    d = a[ok] - b[ok]
    nb = np.linalg.norm(b[ok])
    return {"max_abs_diff": float(np.abs(d).max()), "rel_err": float(np.linalg.norm(d) / nb) if nb else None,
            "max_abs_ref": float(np.abs(b[ok]).max()), "same_nan_pattern": same_nan,
            "n_finite": int(ok.sum()), "n_nonfinite_a": int((~np.isfinite(a) & ~np.isnan(b)).sum())}


def shared_torch_model(params, cfg, rec):
    """(torch model on the benchmark device with the JAX weights, device); records how in rec."""
    t0 = time.perf_counter()
    tmodel, how = torch_model(params, cfg)
    rec["torch_weights"] = {"shared_with_jax": True, "transfer": how, "build_s": time.perf_counter() - t0}
    return tmodel, torch_device()


def fill_sizes(args, table) -> None:
    """Set each (name, full, tiny) default that the command line left as None."""
    for name, full, small in table:
        if getattr(args, name) is None:
            setattr(args, name, small if args.tiny else full)


def start(args):
    """The common start of a figure: out folder, model config, budget, same-run ceiling.
    Returns (cfg, init std, Deadline, ceiling dict)."""
    os.makedirs(args.out, exist_ok=True)
    cfg, std = setup(args)
    return cfg, std, Deadline(args.budget_s), load_ceiling(args.ceiling_json, args.tiny)
