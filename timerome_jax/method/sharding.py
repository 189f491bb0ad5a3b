"""Spread the TIE sweep and the edit capture over all local devices with `jax.sharding`.

Both workloads are embarrassingly parallel along one axis: the *lanes* of the TIE sweep (each lane
is two (layer, step, module) candidates, see `trace`) and the *facts* of the capture (Eqs. 6-8).
We put the devices on a 1-D `Mesh` (axis "d"), replicate the parameters and every other input
(`NamedSharding(mesh, P())`), shard the lane / fact axis (`NamedSharding(mesh, P("d"))`) and run
the existing single-device body under `jax.shard_map`: each device runs exactly the program a
one-device run would, on its slice, with no communication until the results are gathered. One
code path serves one device and n devices (`mesh=` or `devices=`; default: all local devices).

    mesh = make_mesh()                                   # all local devices
    res = trace(params, cfg, fb, tcfg, mesh=mesh)        # == timerome_jax.method.trace.trace(...)
    u, v_o, v_t = capture(params, cfg, batch, 19, "resid", chunk=64, devices=jax.devices()[:2])

Lanes / facts are padded up to a multiple of the device count (filler lanes that patch nothing;
copies of fact 0), and the padding is dropped from the results.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from timerome_jax.method import capture as cap_lib
from timerome_jax.method import trace as tr
from timerome_jax.backbone.config import ModelConfig

AXIS = "d"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """1-D mesh (axis "d") over `devices` (default: all local devices, in `jax.local_devices()` order)."""
    devs = list(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh: no devices given")
    if len(set(devs)) != len(devs):
        raise ValueError(f"make_mesh: devices repeat: {devs}")
    return Mesh(np.asarray(devs, dtype=object), (AXIS,))


def _resolve(mesh: Optional[Mesh], devices) -> Mesh:
    if mesh is not None and devices is not None:
        raise ValueError("pass mesh= or devices=, not both")
    if mesh is None:
        return make_mesh(devices)
    if mesh.axis_names != (AXIS,):
        raise ValueError(f"expected a 1-D mesh with axis {AXIS!r}, got axes {mesh.axis_names}")
    return mesh


def replicate(tree, mesh: Mesh):
    """Every array of `tree` replicated on all devices of `mesh` (arrays already laid out that way
    are passed through, so no extra copy of the parameters is made)."""
    target = NamedSharding(mesh, P())

    def put(x):
        if x is None:
            return None
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.device_put(x, target)

    return jax.tree.map(put, tree)


def shard_rows(tree, mesh: Mesh):
    """Every array of `tree` split along its leading axis over the mesh (length must divide)."""
    return jax.device_put(tree, NamedSharding(mesh, P(AXIS)))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ------------------------------------------------------------------------------------------------
# TIE sweep: lanes sharded
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _lanes_fn(mesh: Mesh, cfg: ModelConfig, tcfg: tr.TraceConfig):
    body = functools.partial(tr.run_lanes, cfg=cfg, tcfg=tcfg)  # a jit inside shard_map is inlined
    # params, fb, noise, corr, clean_acts replicated; lanes (and the scores) split over devices
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), P(), P(), P(AXIS)), out_specs=P(AXIS),
                      check_vma=False)
    return jax.jit(f)


class LanesRunner:
    """`trace.trace(..., lanes_runner=LanesRunner(mesh, cfg, tcfg))`: runs the lanes [N, 6] with the
    lane axis sharded over `mesh` (padded with filler lanes to a multiple of the device count).
    Inputs other than the lanes must already be replicated on the mesh (`replicate`)."""

    def __init__(self, mesh: Mesh, cfg: ModelConfig, tcfg: tr.TraceConfig):
        self.mesh, self.cfg, self.tcfg = mesh, cfg, tcfg
        self.fn = _lanes_fn(mesh, cfg, tcfg)

    def prepare(self, lanes) -> jax.Array:
        """lanes [N, 6] int (NumPy) -> [N', 6] int32 sharded, N' = N rounded up to the device count."""
        lanes = np.asarray(lanes, np.int32).reshape(-1, 6)
        n_pad = _round_up(len(lanes), self.mesh.size) - len(lanes)
        # a filler lane patches layer -1 in both halves: it never fires (see trace.plan_lanes)
        filler = np.asarray([[0, -1, 0, self.tcfg.steps - 1, -1, 0]] * n_pad, np.int32).reshape(-1, 6)
        return shard_rows(np.concatenate([lanes, filler]), self.mesh)

    def lower(self, params, fb, noise, corr, clean_acts, lanes):
        """The `jax.stages.Lowered` of one call (for AOT compilation / memory analysis)."""
        return self.fn.lower(params, fb, noise, corr, clean_acts, self.prepare(lanes))

    def __call__(self, params, fb, noise, corr, clean_acts, lanes) -> jax.Array:
        n = len(np.asarray(lanes).reshape(-1, 6))
        return self.fn(params, fb, noise, corr, clean_acts, self.prepare(lanes))[:n]


def trace(params, cfg: ModelConfig, fb: tr.FactBatch, tcfg: tr.TraceConfig = tr.TraceConfig(),
          mesh: Optional[Mesh] = None, devices: Optional[Sequence[jax.Device]] = None,
          progress=None) -> tr.TraceResult:
    """`timerome_jax.method.trace.trace` with the candidate (lane) axis sharded over a 1-D mesh.

    mesh or devices (default: all local devices). Parameters and facts are replicated; the clean
    and corrupted trajectories (2 x K forwards of B rows, ~0.5% of the sweep) run replicated.
    Returns the same TraceResult as the one-device sweep.
    """
    mesh = _resolve(mesh, devices)
    params, fb = replicate(params, mesh), replicate(fb, mesh)
    return tr.trace(params, cfg, fb, tcfg, progress=progress, lanes_runner=LanesRunner(mesh, cfg, tcfg))


# ------------------------------------------------------------------------------------------------
# capture: facts sharded
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _capture_fn(mesh: Mesh, cfg: ModelConfig, layer: int, module: int):
    def body(params, b):
        return cap_lib.capture_chunk(params, b, cfg, layer, module)

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS), check_vma=False)
    return jax.jit(f)


def capture(params, cfg: ModelConfig, batch: cap_lib.ClozeBatch, layer: int, module: Union[int, str],
            chunk: int = 16, mesh: Optional[Mesh] = None, devices: Optional[Sequence[jax.Device]] = None):
    """`timerome_jax.method.capture.capture` with the fact axis sharded over a 1-D mesh.

    Each call runs `chunk` facts per device (fewer when there are fewer facts), i.e. chunk x n_dev
    facts at once; the last call is padded with copies of fact 0. Returns (u, v_o, v_t), each
    [N, D] float32 NumPy, equal to the one-device capture.
    """
    m = cap_lib.check_capture(cfg, layer, module)
    mesh = _resolve(mesh, devices)
    n, n_dev = batch.n, mesh.size
    per_dev = max(1, min(int(chunk), -(-n // n_dev)))
    step = per_dev * n_dev
    params = replicate(cap_lib.layers_up_to(params, layer), mesh)
    fn = _capture_fn(mesh, cfg, int(layer), m)
    host = jax.tree.map(np.asarray, batch)  # index on the host, then place each call's rows once
    return cap_lib.finish_capture(*cap_lib.chunked(host, n, step, lambda sub: fn(params, shard_rows(sub, mesh))))
