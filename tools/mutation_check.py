"""Mutation check: inject known bugs into a scratch copy of the package and run the tests that
should catch them.

Copies `timerome_jax/`, `tests/` and `pyproject.toml` to a temporary folder, checks that the
selected tests pass there unmodified, then, one mutant at a time, applies a one-line bug patch,
runs that mutant's tests against the copy (PYTHONPATH points at the copy) and reverts. Prints a
Markdown table (mutant, file, caught/missed, seconds, first failing test) and exits 1 if any
mutant is missed, 2 if the unmodified copy already fails.

    python tools/mutation_check.py                 # all mutants
    python tools/mutation_check.py --only dream_eps_ignored --out docs/mutation.md
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from timerome_jax.io import write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str          # relative to the repo root
    old: str           # must occur exactly once in the file
    new: str
    tests: tuple       # pytest node ids


MUTANTS = (
    Mutant("noise_everywhere", "corruption noise on every position, not only the subject tokens",
           "timerome_jax/method/trace.py",
           "return jnp.where(on[..., None], sigma * jax.random.normal(key, (B, T, D), jnp.float32), 0.0)",
           "return sigma * jax.random.normal(key, (B, T, D), jnp.float32)",
           ("tests/test_trace.py::test_embedding_noise_only_on_subject_tokens",
            "tests/test_trace.py::test_tie_by_hand_numpy")),
    Mutant("dream_eps_ignored", "Dream ELBO masks drawn with t instead of p = (1 - eps) t + eps",
           "timerome_jax/diffusion/likelihood.py",
           "masked = amask & (u < p)", "masked = amask & (u < t)",
           ("tests/test_likelihood.py::test_dream_masks_are_stratified_bernoulli",
            "tests/test_likelihood.py::test_dream_masks_use_p_not_t")),
    Mutant("dream_all_or_nothing", "Dream masks all-or-nothing per sample (one uniform per sample)",
           "timerome_jax/diffusion/likelihood.py",
           "masked = amask & (u < p)", "masked = amask & (u_rank[0] < p)",
           ("tests/test_likelihood.py::test_dream_masks_are_stratified_bernoulli",
            "tests/test_likelihood.py::test_dream_masks_use_p_not_t")),
    Mutant("llada_weight_inverted", "LLaDA ELBO weight l / L instead of L / l",
           "timerome_jax/diffusion/likelihood.py",
           "w = Lc.astype(jnp.float32) / l.astype(jnp.float32)", "w = l.astype(jnp.float32) / Lc.astype(jnp.float32)",
           ("tests/test_likelihood.py::test_llada_masks_follow_get_log_likelihood",)),
    Mutant("patch_ignores_step", "a TIE patch fires at every denoising step, not only its own",
           "timerome_jax/backbone/intervene.py",
           "hit = (patch.layer == layer) & (patch.step == step) & (patch.module == module)",
           "hit = (patch.layer == layer) & (patch.module == module)",
           ("tests/test_trace.py::test_patch_only_changes_later_steps_and_last_layer_resid_is_inert",)),
    Mutant("decay_sign", "Eq. 4 weights grow with k' - k (exp(+tau ...))",
           "timerome_jax/method/trace.py",
           "e = np.exp(-tau * (kp - k))", "e = np.exp(tau * (kp - k))",
           ("tests/test_trace.py::test_decay_weights_and_select",)),
    Mutant("topq_keeps_smallest", "TopQ keeps the smallest coefficients",
           "timerome_jax/method/memory.py",
           "keep = (q <= 0) | (a >= thr[..., None])", "keep = (q <= 0) | (a <= thr[..., None])",
           ("tests/test_memory.py::test_topq_keeps_exactly_q_largest", "tests/test_memory.py::test_top_q_tie_rule")),
    Mutant("ridge_lambda_ignored", "ridge term fixed at 1 whatever lam is (Eq. 11)",
           "timerome_jax/method/memory.py",
           "K = Ua @ Ua.T + lam * np.eye(idx.size)", "K = Ua @ Ua.T + np.eye(idx.size)",
           ("tests/test_memory.py::test_kernel_form_equals_primal_ridge",)),
    Mutant("logit_shift_dropped", "Dream/DiffuLLaMA logits not shifted (position i predicts i)",
           "timerome_jax/backbone/model.py",
           "    if cfg.logits_shift:  # AR-aligned", "    if False:  # AR-aligned",
           ("tests/test_hf.py::test_parity_unpadded[dream-7]",)),
    Mutant("ks_wrong_arrays", "forget quality: KS test of the model's truth ratios against themselves",
           "timerome_jax/tofu/metrics.py",
           "return float(stats.ks_2samp(a, b).pvalue)", "return float(stats.ks_2samp(a, a).pvalue)",
           ("tests/test_metrics.py::test_forget_quality_is_ks_pvalue",)),
)


def copy_tree(dst: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("timerome_jax", "tests"):
        shutil.copytree(os.path.join(REPO, name), os.path.join(dst, name), ignore=ignore)
    shutil.copy2(os.path.join(REPO, "pyproject.toml"), dst)


def run_tests(root: str, tests, timeout: int) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rf", *tests]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.time() - t0, "timeout"
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", p.stdout, re.M)
    if m:
        return p.returncode, time.time() - t0, m.group(1)
    tail = p.stdout.strip().splitlines()
    return p.returncode, time.time() - t0, tail[-1] if tail else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="mutant names to run (default: all)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list or not mutants:
        for m in MUTANTS:
            print(f"{m.name:24s} {m.path}: {m.what}")
        return 0 if mutants else 2
    with tempfile.TemporaryDirectory(prefix="timerome_mut_") as root:
        copy_tree(root)
        probe = subprocess.run([sys.executable, "-c", "import timerome_jax; print(timerome_jax.__file__)"],
                               cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True)
        if not probe.stdout.strip().startswith(root):
            print(f"the copy is not what gets imported: {probe.stdout.strip() or probe.stderr}", file=sys.stderr)
            return 2
        all_tests = sorted({t for m in mutants for t in m.tests})
        rc, secs, first = run_tests(root, all_tests, args.timeout)
        print(f"baseline: {len(all_tests)} tests on the unmodified copy, rc={rc}, {secs:.0f} s", flush=True)
        if rc != 0:
            print(f"the unmodified copy fails ({first}); fix that first", file=sys.stderr)
            return 2
        rows = []
        for m in mutants:
            path = os.path.join(root, m.path)
            src = open(path, encoding="utf-8").read()
            if src.count(m.old) != 1:
                print(f"{m.name}: the patch no longer applies ({m.old!r} occurs {src.count(m.old)} times in "
                      f"{m.path}); update MUTANTS", file=sys.stderr)
                return 2
            with open(path, "w", encoding="utf-8") as f:
                f.write(src.replace(m.old, m.new))
            try:
                rc, secs, first = run_tests(root, m.tests, args.timeout)
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(src)
            status = "caught" if rc not in (0, 5) else "MISSED"
            rows.append((m, status, secs, first if status == "caught" else ""))
            print(f"{m.name}: {status} ({secs:.0f} s) {first if status == 'caught' else ''}", flush=True)
    lines = ["| mutant | bug | file | result | s | first failing test |", "|---|---|---|---|---|---|"]
    for m, status, secs, first in rows:
        lines.append(f"| `{m.name}` | {m.what} | `{m.path}` | {status} | {secs:.0f} | `{first}` |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        write_text(args.out, table + "\n")
    missed = [m.name for m, status, _, _ in rows if status != "caught"]
    if missed:
        print(f"\nmissed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
