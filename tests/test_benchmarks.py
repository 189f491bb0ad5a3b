"""The issue-5 benchmark suite end to end on a CPU: `run_all --tiny` writes every figure's JSON with
the fields the summary and the issue need, the FLOP counts match an independent count, the timed
JAX runs compiled nothing, and where JAX and PyTorch compute the same thing (same weights, fp32)
they agree: TIE arrays, captured keys/values and the ridge solve, generated tokens."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EarlyProcess

from timerome_jax.method import memory as mem_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


# one run serves every test here: --gate adds the gated rows of figures b and c to the same JSON
# (test_gate_rows_...), --stacked 1 the stacked rows of c, --kernel-profile c's batch-1 kernel table;
# --repeats 1 still leaves >= 1 steady run after the compile run, which is all the assertions use.
# It starts right after collection (conftest.EarlyProcess) and runs beside the in-process tests.
RUN_ALL = EarlyProcess(__name__, "results", lambda out: [
    sys.executable, os.path.join(BENCH, "run_all.py"), "--tiny", "--out", out, "--repeats", "1",
    "--figure-args", "b=--gate", "--figure-args",
    f"cd=--gate --stacked 1 --compile-order sequential --kernel-profile {os.path.join(out, 'kernel_traces')}"],
    env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def results():
    p = RUN_ALL.result()
    out = RUN_ALL.dir
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    figs = {}
    for name in ("ceiling", "fig_a_tie", "fig_b_install", "fig_c_generate", "fig_d_memory", "tie_screen", "run_all"):
        with open(os.path.join(out, name + ".json")) as f:
            figs[name] = json.load(f)
    with open(os.path.join(out, "summary.md")) as f:
        figs["summary"] = f.read()
    return figs


def _flops(c, rows, T, layers=None, head=True):
    """Independent count: 2 x matmul params x tokens + attention 4 T^2 d per layer + LM head."""
    L = c["n_layers"] if layers is None else layers
    d, f, h, hd, kv = c["d_model"], c["d_ff"], c["n_heads"], c["head_dim"], c["n_kv_heads"]
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    out = rows * (2 * per_layer * L * T + 4 * T * T * h * hd * L)
    return out + (rows * T * 2 * d * c["vocab_size"] if head else 0)


def cfig_official_absent(results):
    """Without --official-dir figure c runs no official section and says nothing is missing."""
    return "official" not in results["fig_c_generate"] and "official" not in results["fig_c_generate"]["errors"]


def _run_all_module():
    sys.path.insert(0, BENCH)
    import run_all

    return run_all


def test_run_all_plan_two_gpus_fits_and_keeps_order_constraints():
    ra = _run_all_module()

    class A:
        gpus, tiny, out = 2, False, "/tmp/x"

    jobs = ra.expand(ra.jobs_for(ra.DEFAULT.split(",")), A)
    names = sorted(j["name"] for j in jobs)
    # a and screen asked for together are one process writing both files
    assert names == sorted(["ceiling", "a+screen", "b", "cd@1", "cd@32", "validate"])
    assert ra.FILES["a+screen"] == ra.FILES["a"] + ra.FILES["screen"]
    lanes = ra.plan(jobs, 2)
    got = [[j["name"] for j in lane] for lane in lanes]
    assert sorted(n for lane in got for n in lane) == names  # every job once
    assert got[0][0] == "ceiling" and all("ceiling" not in lane for lane in got[1:])
    assert "validate" in got[1] and got[1][0] == "validate"  # needs no ceiling: starts at once
    assert max(sum(j["est"] for j in lane) for lane in lanes) <= 540
    # screen alone (no a): its own job, which times a full sweep itself
    assert ra.jobs_for(["screen"]) == ["ceiling", "screen"]
    A.gpus = 1  # one GPU: cd is one process, the jobs run in FIGURES order
    one = ra.plan(ra.expand(ra.jobs_for(ra.DEFAULT.split(",")), A), 1)[0]
    assert [j["name"] for j in one] == ["ceiling", "a+screen", "b", "cd", "validate"]
    assert [j["name"] for j in ra.plan(ra.expand(ra.jobs_for(["a", "b", "c", "screen"]), A), 1)[0]] == \
        ["ceiling", "a+screen", "b", "cd"]


def test_run_all_one_gpu_runs_validate_beside_the_tie_compile_and_fits_the_budget():
    ra = _run_all_module()

    class A:
        gpus, tiny, out = 1, False, "/tmp/x"

    lanes = ra.plan(ra.expand(ra.jobs_for(ra.DEFAULT.split(",")), A), 1)
    ra.attach_companions(lanes)
    assert [j["name"] for j in lanes[0]] == ["ceiling", "a+screen", "b", "cd"]
    host = lanes[0][1]
    assert host["companion"]["name"] == "validate"
    # validate adds only what it outlasts a+screen's untimed phase by; the whole entry fits 540 s
    assert ra.lane_est(lanes[0]) == sum(j["est"] for j in lanes[0]) + max(
        host["companion"]["est"] - ra.FIGURES["a+screen"]["overlap_s"], 0)
    assert ra.lane_est(lanes[0]) <= 540


def test_run_all_merged_job_takes_both_figures_arguments():
    ra = _run_all_module()
    ns = type("NS", (), dict(tiny=True, seed=0, official_dir=None, tie_layout="unstacked", skip_torch=False,
                             repeats_a=1, repeats=3, profile=None,
                             extra={"a": "--chunk 2", "screen": "--top-frac 0.1"}))()
    job = ra.expand(ra.jobs_for(["a", "screen"]), type("A", (), dict(gpus=1, tiny=True, out="/tmp/x")))[1]
    cmd = ra.command(job, ns, "/tmp/x/ceiling.json", 10.0)
    assert cmd[cmd.index("--what") + 1] == "sweep,screen" and cmd[-4:] == ["--chunk", "2", "--top-frac", "0.1"]


def test_run_all_merges_split_figure_parts(tmp_path):
    ra = _run_all_module()
    parts = []
    for b in ("1", "32"):
        out = tmp_path / f"cd@{b}"
        out.mkdir()
        for f in ra.FILES["cd"]:
            (out / f).write_text(json.dumps({"status": "ok", "errors": {}, "shapes": {"batches": [int(b)]},
                                             "batches": {b: {"x": int(b)}}, "met": {b: {"ok": True}}}))
        parts.append({"name": f"cd@{b}", "out": str(out)})
    (tmp_path / "cd@32" / "fig_c_generate.json").write_text(json.dumps(
        {"status": "partial", "errors": {"official": "boom"}, "batches": {"32": {"x": 32}}, "met": {}}))
    ra.merge_parts(str(tmp_path), "cd", parts)
    c = json.loads((tmp_path / "fig_c_generate.json").read_text())
    assert c["batches"] == {"1": {"x": 1}, "32": {"x": 32}} and c["shapes"]["batches"] == [1, 32]
    assert c["status"] == "partial" and c["errors"] == {"official (cd@32)": "boom"}
    d = json.loads((tmp_path / "fig_d_memory.json").read_text())
    assert d["status"] == "ok" and set(d["met"]) == {"1", "32"}


@pytest.mark.slow
def test_every_figure_records_card_versions_knobs_and_ceiling(results):
    ceil = results["ceiling"]
    assert ceil["status"] == "ok"
    assert ceil["jax"]["matmul_flops_per_s"] > 0 and ceil["torch"]["matmul_flops_per_s"] > 0
    assert ceil["ceiling"]["matmul_flops_per_s"] == ceil["jax"]["matmul_flops_per_s"]
    # the bytes floors count weights read once: the ceiling is the read bandwidth; the copy is recorded beside it
    assert ceil["ceiling"]["bytes_per_s"] == ceil["jax"]["read_bytes_per_s"] > 0 and ceil["jax"]["copy_bytes_per_s"] > 0
    for name in ("fig_a_tie", "fig_b_install", "fig_c_generate", "fig_d_memory"):
        fig = results[name]
        assert fig["status"] == "ok", (name, fig["errors"])
        env = fig["env"]
        assert env["jax_device_kind"] and env["jax_version"] == jax.__version__ and env["torch_version"]
        assert fig["knobs"]["tiny"] is True and "budget_s" in fig["knobs"]
        assert fig["shapes"]["config"]["n_layers"] == 2
    for name in ("fig_a_tie", "fig_b_install", "fig_c_generate"):
        # the floors use the ceiling measured in this same run
        assert results[name]["ceiling"]["matmul_flops_per_s"] == ceil["ceiling"]["matmul_flops_per_s"]
    assert [j["job"] for j in results["run_all"]["jobs"]] == ["ceiling", "a+screen", "b", "cd"]
    assert cfig_official_absent(results)
    s = results["summary"]
    for head in ("## a.", "## b.", "## c.", "## d.", "JAX " + jax.__version__, "**cpu**"):
        assert head in s, head


@pytest.mark.slow
def test_fig_a_tie_sweep(results):
    a = results["fig_a_tie"]
    c, sh = a["shapes"]["config"], a["shapes"]
    B, T, K, R = sh["facts"], sh["seq_len"], sh["steps"], sh["n_noise"]
    rows = (1 + R) * K * B + R * 3 * c["n_layers"] * (K * (K + 1) // 2) * B
    assert a["work"]["rows"] == rows
    assert a["floor"]["flops"] == _flops(c, rows, T)
    assert a["floor"]["floor_s"] >= a["floor"]["flops"] / a["ceiling"]["matmul_flops_per_s"] * 0.999
    j, t = a["jax"], a["torch"]
    assert j["n_steady"] >= 1 and j["steady_s"] > 0 and j["compile_runs"] == []  # compiled ahead, not in timing
    assert j["compile"]["compile_s"] > 0 and j["compile"]["n_compilations"] >= 3
    assert t["n_steady"] >= 1 and t["steady_s"] > 0
    assert a["torch_over_jax"] == pytest.approx(t["steady_s"] / j["steady_s"])
    assert a["torch_weights"]["shared_with_jax"] and a["torch_weights"]["transfer"] == "dlpack"
    ag = a["agreement"]
    assert ag["tie_bar"]["max_abs_ref"] > 1e-2  # the maps are not all zero
    for k in ("tie", "tie_bar"):
        assert ag[k]["same_nan_pattern"] and ag[k]["max_abs_diff"] < 1e-3, (k, ag[k])
    for k in ("clean", "corrupted"):
        assert ag[k]["rel_err"] < 1e-5, (k, ag[k])
    assert all(a["jax_result_finite"].values())


@pytest.mark.slow
def test_screen_figure(results):
    scr = results["tie_screen"]
    assert scr["status"] == "ok", scr["errors"]
    # steady, or estimated as wall - compile when the soft budget ran out first
    assert scr["screen"]["steady_s"] > 0 and scr["screen_plus_topk"]["steady_s"] > 0
    assert scr["screen_plus_topk"]["n_candidates"] == 3  # ceil(0.05 * 2 layers * 4 steps) = 1 per module
    assert scr["full_sweep_s"] == results["fig_a_tie"]["jax"]["steady_s"]  # figure a of the same run
    assert scr["full_over_screen_plus_topk"] == pytest.approx(scr["full_sweep_s"] / scr["screen_plus_topk"]["steady_s"])


@pytest.mark.slow
def test_fig_b_install(results):
    b = results["fig_b_install"]
    c, sh = b["shapes"]["config"], b["shapes"]
    assert sorted(int(n) for n in b["sizes"]) == [1, 4, 40]
    for n, row in b["sizes"].items():
        n = int(n)
        assert row["capture_flops"] == 2 * _flops(c, n, sh["seq_len_object_cloze"], sh["layer"] + 1, head=False)
        j, t = row["jax"], row["torch"]
        assert j["capture"]["steady_s"] > 0 and j["solve"]["steady_s"] > 0 and t["capture"]["steady_s"] > 0
        # install_s is the library's install timed whole (the device solve up to DEVICE_SOLVE_MAX facts);
        # it pays the cached fingerprint lookup, the read from the weights is once per model
        assert j["install_s"] == j["install"]["steady_s"] > 0
        assert j["solved_on"] == ("device" if n <= mem_lib.DEVICE_SOLVE_MAX else "host")
        assert j["install_s_parts"] == pytest.approx(j["capture"]["steady_s"] + j["solve"]["steady_s"]
                                                     + b["fingerprint_cached_s"])
        assert j["install_s_first_for_this_model"] == pytest.approx(
            j["install_s"] - b["fingerprint_cached_s"] + b["fingerprint_s"])
        assert j["ratio_to_floor"] == pytest.approx(j["install_s"] / row["floor"]["floor_s"])
        for k in ("u", "v_o", "v_t", "D"):
            assert row["agreement"][k]["rel_err"] < 1e-4, (n, k, row["agreement"][k])
        assert row["agreement"]["G"]["rel_err"] < 1e-3, (n, row["agreement"]["G"])
    # the unstacked layout at the smallest size (the |F| = 1 target): the library install, timed whole
    u = b["sizes"]["1"]["jax_unstacked"]
    assert u["install_s"] == u["install"]["steady_s"] > 0 and u["solved_on"] == "device" and u["u_equal_to_stacked"]
    assert u["ratio_to_floor"] == pytest.approx(u["install_s"] / b["sizes"]["1"]["floor"]["floor_s"])
    assert b["met"]["1"]["unstacked_within_2x_floor"] == (u["ratio_to_floor"] <= 2.0)
    # each size compiles its chunk shape at most once (its first call); the other timed calls compile nothing
    for row in b["sizes"].values():
        assert len(row["jax"]["capture"]["compile_runs"]) <= 1 and row["jax"]["capture"]["n_steady"] >= 1


@pytest.mark.slow
def test_fig_c_generation_and_fig_d_memory(results):
    cfig, dfig = results["fig_c_generate"], results["fig_d_memory"]
    c, sh = cfig["shapes"]["config"], cfig["shapes"]
    for bsz, row in cfig["batches"].items():
        B = int(bsz)
        assert row["flops"] == _flops(c, B * sh["steps"], sh["seq_len"])
        for fw in ("jax", "torch"):
            for name in ("no_edit", "edit"):
                m = row[fw][name]
                assert m["n_steady"] >= 1 and m["steady_s"] > 0 and m["step_ms"] == pytest.approx(
                    1e3 * m["steady_s"] / sh["steps"])
            assert row[fw]["edit_overhead_pct"] == pytest.approx(
                100 * (row[fw]["edit"]["steady_s"] / row[fw]["no_edit"]["steady_s"] - 1))
        assert row["jax"]["no_edit"]["compile_runs"] == [] and row["jax"]["edit"]["compile_runs"] == []
        # the same sampler, the same weights, fp32: the same tokens, with and without the edit
        for name in ("no_edit", "edit"):
            assert row["agreement"][name]["tokens_equal_fraction"] == 1.0, (bsz, name, row["agreement"])
        assert row["agreement"]["jax_masks_left"] == {"no_edit": 0, "edit": 0}
        # the verdict rows are the unstacked layout; the stacked one (--stacked 1) gives the same tokens
        assert cfig["jax_layout"] == "unstacked" and sh["layout"] == "unstacked"
        assert row["agreement"]["stacked_tokens_equal_fraction"] == {"no_edit": 1.0, "edit": 1.0}
        u = row["jax_stacked"]
        assert u["no_edit"]["compile_runs"] == [] and u["no_edit"]["step_ms"] > 0 and "edit_overhead_pct" in u
        # interleaved rounds: batch 1 takes --repeats-b1 (default 11) rounds, the others --repeats
        want = sh["rounds"]["batch_1"] if B == 1 else sh["rounds"]["other_batches"]
        assert row["jax"]["edit_overhead_pct_n_pairs"] == want == row["jax"]["no_edit"]["n_steady"]
        assert row["jax"]["edit_overhead_pct_paired_median"] is not None
        d = dfig["batches"][bsz]
        assert d["edit_bytes"] == sh["edit"]["bytes"] > 0
        add = d["jax"]["added"]
        # the compiled program's arguments grow by the edit arrays the forward reads (W, Dm, active;
        # to within the scalar fields), never by more than the edit's own arrays
        read = sh["edit"]["bytes_read_by_forward"]
        assert read - 64 <= add["argument_size_in_bytes"] <= d["edit_bytes"] + 64 and read < d["edit_bytes"]
        assert set(d["met"]) == {"arguments_grow_by_edit_arrays_only", "temp_growth_at_most_edit_bytes"}
    # the edit really acts (alpha 0.5 on a tiny model): some generated tokens change under it
    assert max(row["agreement"]["jax_edit_changed_tokens_fraction"] for row in cfig["batches"].values()) > 0


@pytest.mark.slow
def test_stage_variant_full_is_the_library_lane_loop():
    """bench_tie's stage variants run trace.run_lanes with another step; "full" must give its exact scores."""
    sys.path.insert(0, BENCH)
    import bench_tie as bt
    import common as C

    from timerome_jax.method import trace as tr

    cfg = C.model_config(True)
    params = C.init_params(jax.random.key(0), cfg, 0.25)
    fb = bt.make_facts(cfg, 2, 6, 3, 2, 0)
    tcfg = tr.TraceConfig(steps=3, n_noise=1, chunk=3)
    with jax.default_matmul_precision("highest"):
        fb_u, noise, corr, acts = bt.lane_inputs(params, cfg, fb, tcfg)
        assert fb_u.pad_mask is None  # unpadded facts run without a mask
        lanes = jnp.asarray(tr.plan_lanes(cfg.n_layers, tcfg.steps))
        ref = np.asarray(tr.run_lanes(params, fb_u, noise, corr, acts, lanes, cfg=cfg, tcfg=tcfg))
        full = np.asarray(bt.stage_lanes(params, fb_u, noise, corr, acts, lanes, cfg=cfg, tcfg=tcfg, stage="full"))
        body = np.asarray(bt.stage_lanes(params, fb_u, noise, corr, acts, lanes, cfg=cfg, tcfg=tcfg,
                                         stage="body_only"))
    np.testing.assert_array_equal(full, ref)
    assert body.shape == ref.shape and np.isfinite(body).all() and not np.allclose(body, ref)


def test_bench_generate_records_its_compile_order_and_batch1_kernels(results):
    """--compile-order is recorded with the compile wall time; --kernel-profile traces one batch-1
    generation per variant (and no other batch size) and lists what the edit changes."""
    c = results["fig_c_generate"]
    assert c["compile"]["order"] == "sequential" and c["compile"]["wall_s_all_programs"] > 0
    kp = c["batches"]["1"]["jax"]["kernel_profile"]
    for name in ("no_edit", "edit", "gated"):
        assert kp[name]["kernels_per_step"] > 0 and kp[name]["kernel_us_per_step"] > 0 and kp[name]["top_per_step"]
    for name in ("edit", "gated"):
        diff = kp[f"diff_{name}_vs_no_edit"]
        assert diff and {"name", "us_base", "us_other", "us_per_step_change"} <= set(diff[0])
        changes = [abs(d["us_other"] - d["us_base"]) for d in diff]
        assert changes == sorted(changes, reverse=True)
    assert all("kernel_profile" not in row["jax"] for B, row in c["batches"].items() if B != "1")


@pytest.mark.slow
def test_gate_rows_of_bench_generate_and_bench_install(results):
    """--gate adds the gated memory's rows (the latch default, no per-token gate): its per-step overhead
    over the ungated edit, the per-generation probe and its amortised share of a step, the whole
    generation's overhead, and the gated install time (slot keys + gated build + tau_seq) beside the
    one-time calibration."""
    c = results["fig_c_generate"]
    for row in c["batches"].values():
        j = row["jax"]
        assert j["gated"]["steady_s"] > 0 and j["gated"]["compile_runs"] == []
        assert j["gated"]["memory"]["token_gate"] is False
        assert j["gated"]["probe"]["steady_s"] > 0 and j["gated"]["one_step"]["gated_primed"]["steady_s"] > 0
        for k in ("gate_overhead_pct_of_step", "gate_overhead_pct_over_edit", "gate_step_overhead_pct_of_step",
                  "gate_step_overhead_pct_over_edit", "probe_pct_of_step"):
            assert np.isfinite(j[k]), k
        assert j["probe_amortised_pct_of_step"] == pytest.approx(j["probe_pct_of_step"] / c["shapes"]["steps"])
    assert all({"gate_overhead_at_most_1pct", "gate_with_amortised_probe_at_most_1pct"} <= set(m)
               for m in c["met"].values())
    b = results["fig_b_install"]
    assert b["gate_calibration_s"] > 0
    for row in b["sizes"].values():
        g = row["jax"]["gate"]
        assert g["slot_keys"]["steady_s"] > 0 and g["solve_with_gate"]["steady_s"] > 0 and g["token_gate"] is False
        assert g["install_s"] > row["jax"]["install_s"] - row["jax"]["solve"]["steady_s"]
        assert g["install_s_with_calibration"] == pytest.approx(g["install_s"] + b["gate_calibration_s"])
    assert "Gated install" in results["summary"] and "probe" in results["summary"]


def test_measure_rounds_calls_each_once_per_round_in_a_seeded_order():
    """With shuffle_seed, every round calls every function once, the order changes between rounds and
    repeats with the seed; gap_s idles before each call outside the timed interval."""
    sys.path.insert(0, BENCH)
    import common as C

    def run(seed, gap=0.0):
        log = []
        fns = {k: (lambda k=k: log.append(k)) for k in "abc"}
        res, rounds = C.measure_rounds(fns, want=12, sync=lambda _: None, gap_s=gap, shuffle_seed=seed)
        return log, res, rounds

    log, res, rounds = run(0)
    per_round = [log[i:i + 3] for i in range(0, len(log), 3)]
    assert len(rounds) == 12 and all(sorted(r) == ["a", "b", "c"] for r in per_round)
    assert len({tuple(r) for r in per_round}) > 1 and run(0)[0] == log and run(1)[0] != log
    assert run(None)[0] == list("abc") * 12
    _, res, _ = run(0, gap=0.01)
    assert all(t < 0.01 for k in "abc" for t in res[k]["times_s"])
