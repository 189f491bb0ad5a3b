"""Probe: the batch-1 step's small kernels, and ways of writing the dense layer that may need fewer.

The profile of the 8B batch-1 step (results/probes_h200/profile_fused_step.json) shows, besides the
four GEMMs and attention, about 14 small fusions per layer of 1-4 us each: the two residual adds,
the two RMSNorms, RoPE's concatenates for q and k, the v slice, SwiGLU's multiply. Each variant
below writes the layer differently (`dense_forward`, the fused unstacked layout, no interventions)
and replaces `model.forward` while the library's batch-1 generation (`sampler.generate_scan`,
prompt 64 + 64 new tokens, 64 steps) is traced, so the sampler around it is the library's.

Variant flags (joined with "+"; "lib" is the library itself, "copy" the layer written here with
float32 GEMM outputs cast to bf16; all under the options the library compiles generation with,
`sampler.GENERATION_COMPILER_OPTIONS`):
- rope_concat: rotate_half as a concatenate (the library's form before it became a reversal);
- rope_qk: RoPE once over q|k ([B, T, 2H, hd]), then split;
- resid_f32: the residual added to the float32 GEMM output before the one cast to bf16;
- resid_dt: the sub-layer's last GEMM writes bf16 itself, then the bf16 residual add;
- dt_all: every GEMM writes bf16 itself (the library's `model._mm`);
- swiglu_f32: silu(gate) * up from the float32 GEMM output, one cast after;
- mask: attention with the all-True key mask (the library drops it: `model.attention_mask`);
- @OPTSET: compiled with that option set of `probes.bandwidth.OPTION_SETS` (e.g. triton_on: XLA's
  Triton GEMMs back on, as before the library turned them off).
Per variant: compile time, step time (interleaved rounds, median), tokens equal to the library's,
kernels per step and the top kernels of one profiled generation; --hlo-dir gets each program's
optimized HLO (gzip). Writes --out (JSON).

    python benchmarks/probes/step_fusions.py --out /tmp/fus.json --hlo-dir /tmp/hlo --trace-dir /tmp/tr   # GPU
    python benchmarks/probes/step_fusions.py --out /tmp/fus.json --tiny                                   # CPU
    python benchmarks/probes/step_fusions.py --out /tmp/fus32.json --batch 32 --steps 8 --calls 3         # batch 32
"""
from __future__ import annotations

import argparse
import functools
import gzip
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from probes.bandwidth import OPTION_SETS, host_timed  # noqa: E402
from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.diffusion import sampler  # noqa: E402

DEFAULT_VARIANTS = ("lib,lib@triton_on,copy+dt_all,copy+resid_dt,copy,copy+resid_dt+mask,copy+rope_concat,"
                    "copy+rope_concat+mask@triton_on")


def rope_by_concat(x, cos, sin, rot_dim: int):
    """RoPE with HF's rotate_half as a concatenate (the same numbers as `model.apply_rope`)."""
    xr, xp = x[..., :rot_dim].astype(jnp.float32), x[..., rot_dim:]
    half = rot_dim // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = (xr * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)
    return jnp.concatenate([out, xp], axis=-1) if xp.shape[-1] else out


def _dot32(x, w, dt):
    return jnp.einsum("...d,df->...f", x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)


def _dot_dt(x, w, dt, flags):
    """x @ w in dt: written in dt by the GEMM (dt_all) or a float32 output cast."""
    if "dt_all" in flags:
        return jnp.einsum("...d,df->...f", x.astype(dt), w.astype(dt), preferred_element_type=dt)
    return _dot32(x, w, dt).astype(dt)


def _proj_residual(h, x, w, dt, flags):
    """h + x @ w, written as the flags say."""
    if "resid_f32" in flags:
        return (h.astype(jnp.float32) + _dot32(x, w, dt)).astype(dt)
    if "resid_dt" in flags or "dt_all" in flags:
        return h + jnp.einsum("...d,df->...f", x.astype(dt), w.astype(dt), preferred_element_type=dt)
    return h + _dot32(x, w, dt).astype(dt)


def dense_layer(lp, h, cos, sin, pad_mask, cfg, flags):
    """One dense layer of the fused unstacked layout (`model.FUSED`), no interventions. h [B,T,D]."""
    dt = model_lib.cdtype(cfg)
    b, t, _ = h.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    rope = rope_by_concat if "rope_concat" in flags else model_lib.apply_rope
    n = model_lib.rms_norm(h, lp["attn_norm"], cfg.norm_eps)
    y = _dot_dt(n, lp["wqkv"], dt, flags)
    if "rope_qk" in flags:
        qk = rope(y[..., :(nh + nkv) * hd].reshape(b, t, nh + nkv, hd), cos, sin, cfg.rot_dim)
        q, k = qk[:, :, :nh], qk[:, :, nh:]
        v = y[..., (nh + nkv) * hd:].reshape(b, t, nkv, hd)
    else:
        q, k, v = jnp.split(y, [nh * hd, (nh + nkv) * hd], axis=-1)
        q = rope(q.reshape(b, t, nh, hd), cos, sin, cfg.rot_dim)
        k = rope(k.reshape(b, t, nkv, hd), cos, sin, cfg.rot_dim)
        v = v.reshape(b, t, nkv, hd)
    o = model_lib.attention(q, k, v, pad_mask if "mask" in flags else None, cfg).reshape(b, t, nh * hd)
    h = _proj_residual(h, o, lp["wo"], dt, flags)
    m = model_lib.rms_norm(h, lp["mlp_norm"], cfg.norm_eps)
    if "swiglu_f32" in flags:
        gate, up = jnp.split(_dot32(m, lp["w_gate_up"], dt), 2, axis=-1)
        act = (jax.nn.silu(gate) * up).astype(dt)
    else:
        gate, up = jnp.split(_dot_dt(m, lp["w_gate_up"], dt, flags), 2, axis=-1)
        act = jax.nn.silu(gate) * up
    return _proj_residual(h, act, lp["w_down"], dt, flags)


def dense_forward(params, tokens, cfg, pad_mask=None, intervene=None, step=0, *, flags=frozenset()):
    """`model.forward` for the fused unstacked dense layout without interventions. tokens [B,T]
    -> logits [B,T,V] float32."""
    if intervene is not None:
        raise ValueError("dense_forward: no interventions in this probe")
    x = model_lib.embed(params, tokens, cfg)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    cos, sin = model_lib.rope_tables(positions, cfg.rot_dim, cfg.rope_theta)
    for lp in params["layers"]:
        x = dense_layer(lp, x, cos, sin, pad_mask, cfg, flags)
    return model_lib.head(params, x, cfg)


def parse_variant(name: str):
    """'a+b@opt' -> (frozenset({'a', 'b'}), option-set name)."""
    body, _, opt = name.partition("@")
    flags = frozenset(f for f in body.split("+") if f)
    known = {"lib", "copy", "rope_concat", "rope_qk", "resid_f32", "resid_dt", "swiglu_f32", "mask", "dt_all"}
    if flags - known or (opt and opt not in OPTION_SETS):
        raise ValueError(f"unknown variant {name!r}: flags of {sorted(known)}, option sets of {list(OPTION_SETS)}")
    return flags, opt or "default"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--calls", type=int, default=9, help="interleaved timed rounds")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--hlo-dir", default=None)
    ap.add_argument("--trace-dir", default=None, help="profile one generation per variant here")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cfg = C.model_config(args.tiny)
    params = model_lib.unstack(C.init_params(jax.random.key(0), cfg, C.default_init_std(args.tiny)), consume=True)
    rng = np.random.default_rng(1)
    n_prompt, n_new = (8, 8) if args.tiny else (64, 64)
    x, pad, pm = sampler.make_canvas(C.random_tokens(rng, (args.batch, n_prompt), cfg).tolist(), n_new, cfg)
    scfg = sampler.SamplerConfig(steps=args.steps if not args.tiny else 8)
    sched = sampler.schedule(x, pad, cfg, scfg)
    key = jax.random.key(3)
    lib_pad = model_lib.attention_mask(pad)  # what `sampler.generate` hands the jitted scan
    rec = {"device": jax.devices()[0].device_kind, "batch": args.batch, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "shape": C.shape_info(cfg), "steps": scfg.steps, "weight_bytes": C.weight_bytes(cfg), "variants": {}}
    progs, tokens, pads = {}, {}, {}
    saved = model_lib.forward
    for name in args.variants.split(","):
        flags, opt = parse_variant(name)
        row = rec["variants"][name] = {"flags": sorted(flags), "options": opt}
        t0 = time.perf_counter()
        if "lib" not in flags:
            model_lib.forward = functools.partial(dense_forward, flags=flags)
        jax.clear_caches()
        try:
            pads[name] = lib_pad if "lib" in flags else pad
            progs[name] = sampler.generate_scan.lower(params, x, pads[name], pm, sched, key, None, cfg=cfg, scfg=scfg,
                                                      return_history=False).compile(
                compiler_options=OPTION_SETS[opt] if C.on_gpu() else {})
        except Exception as e:  # noqa: BLE001 - a variant this XLA rejects is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            continue
        finally:
            model_lib.forward = saved
            jax.clear_caches()
        row["compile_s"] = time.perf_counter() - t0
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with gzip.open(os.path.join(args.hlo_dir, f"{name.replace('@', '_at_')}.hlo.txt.gz"), "wt") as f:
                f.write(progs[name].as_text())
        tokens[name] = np.asarray(progs[name](params, x, pads[name], pm, sched, key, None))
        if args.trace_dir:
            s = C.traced_kernels(lambda: progs[name](params, x, pads[name], pm, sched, key, None),
                                 os.path.join(args.trace_dir, name.replace("@", "_at_")), top=30)
            row["profile"] = C.kernels_per_step(s, scfg.steps)
        print(f"[fus] {name}: compiled in {row['compile_s']:.1f} s"
              + (f", {row['profile']['kernels_per_step']:.0f} kernels / step, "
                 f"{row['profile']['kernel_us_per_step'] / 1e3:.3f} ms of kernels / step" if "profile" in row else ""),
              flush=True)
    ts = {name: [] for name in progs}
    for _ in range(args.calls):  # interleaved, so that drift between the variants cancels
        for name, prog in progs.items():
            ts[name] += host_timed(lambda: prog(params, x, pads[name], pm, sched, key, None), 1)
    ref = tokens.get("lib")
    for name in progs:
        step = statistics.median(ts[name]) / scfg.steps
        row = rec["variants"][name]
        row.update(step_s=step, bytes_per_s=rec["weight_bytes"] / step, step_times_s=[t / scfg.steps for t in ts[name]],
                   tokens_equal_lib=None if ref is None else bool(np.array_equal(tokens[name], ref)),
                   tokens_equal_fraction_lib=None if ref is None else float(np.mean(tokens[name] == ref)))
        print(f"[fus] {name}: {1e3 * step:.3f} ms / step, {rec['weight_bytes'] / step / 1e12:.3f} TB/s of weights, "
              f"tokens = lib: {row['tokens_equal_lib']}", flush=True)
    rec["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, rec)


if __name__ == "__main__":
    main()
