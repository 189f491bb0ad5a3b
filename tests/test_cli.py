"""`timerome` CLI: known errors print one line and exit non-zero (no traceback unless --debug), every
option documents its default, `edit` writes a memory that `eval --memory` installs, and `eval` with a
cached retain reference. Calls `cli.main` in-process; one subprocess test (slow) checks the real exit."""
import argparse
import json
import os
import shutil
import sys

import jax
import pytest
from conftest import EarlyProcess


from timerome_jax import cli
from timerome_jax.backbone.model import init_params
from timerome_jax.tofu import metrics as M
from timerome_jax.tofu.models import ReferenceMismatchError, write_reference_info
from timerome_jax.tofu.reference import retain_tr_cache_path
from timerome_jax.tofu.truth_ratios import load_retain_tr

FAST_EVAL = ["--metrics", "forget_lp", "--n-mc", "1", "--seeds", "0", "--limit", "2", "--batch-size", "4",
             "--length-bucket", "64", "--no-progress"]


def run(argv, capsys):
    """(exit status, stdout, stderr) of `timerome argv`, in-process."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse: bad command line
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc not in (0, None)
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    nope = str(tmp_path / "nope")
    for cmd in (["eval"], ["trace"], ["demo"], ["edit", "--layer", "1"]):
        rc, out, err = run(cmd + ["--model", nope, "--out", str(tmp_path / "o")], capsys)
        assert_one_line_error(rc, err, f"model folder {nope} does not exist")
        assert rc == 1
    # --debug (before or after the sub-command) shows the real exception
    for argv in (["--debug", "eval", "--model", nope], ["eval", "--debug", "--model", nope]):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            cli.main(argv)


def test_bad_config_and_missing_tokenizer(tiny_llada_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    rc, _, err = run(["eval", "--model", str(bad), "--out", str(tmp_path)] + FAST_EVAL, capsys)
    assert_one_line_error(rc, err, "config.json", "not valid JSON")
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    rc, _, err = run(["trace", "--model", str(bad)], capsys)
    assert_one_line_error(rc, err, "unsupported architecture 'GPT2LMHeadModel'")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(["trace", "--model", str(empty)], capsys)
    assert_one_line_error(rc, err, "neither a converted checkpoint", "nor a Hugging Face folder")
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_llada_dir, f), notok / f)
    rc, _, err = run(["edit", "--model", str(notok), "--layer", "0"], capsys)
    assert_one_line_error(rc, err, "has no tokenizer files")


def test_bad_command_line_is_one_line(tmp_path, capsys):
    rc, _, err = run(["eval", "--split", "forget99"], capsys)
    assert rc == 2
    assert_one_line_error(rc, err, "argument --split: invalid choice: 'forget99'")
    rc, _, err = run(["eval", "--dtype", "float16"], capsys)
    assert_one_line_error(rc, err, "invalid choice: 'float16'", "'bfloat16'")
    rc, _, err = run(["frobnicate"], capsys)
    assert_one_line_error(rc, err, "invalid choice: 'frobnicate'")
    rc, _, err = run(["edit", "--trace", str(tmp_path / "none.npz")], capsys)
    assert rc == 1
    assert_one_line_error(rc, err, "no --layer given and no trace result")


def _options(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in [("timerome", parser), *sub.choices.items()]:
        for a in p._actions:
            if a.option_strings and not isinstance(a, argparse._HelpAction):
                yield name, p, a


def test_every_option_has_help_with_its_default():
    parser = cli.build_parser()
    fmt = cli.HelpFormatter("timerome")
    seen = set()
    for name, p, a in _options(parser):
        h = fmt._get_help_string(a)
        assert a.help and len(a.help) > 8, (name, a.option_strings)
        assert "default" in h, (name, a.option_strings, h)
        seen.add((name, a.option_strings[0]))
    assert {("eval", "--memory"), ("eval", "--dtype"), ("demo", "--seeds"), ("edit", "--alpha")} <= seen
    for name, p, a in _options(parser):
        if a.dest == "dtype":
            assert tuple(a.choices) == ("float32", "bfloat16") and a.default is None
            assert "checkpoint" in a.help


def test_layout_option_on_every_loading_command_reaches_the_loader(monkeypatch, capsys, tmp_path):
    loading = {name for name, _, a in _options(cli.build_parser()) if a.dest == "model"}
    assert {"demo", "trace", "edit", "eval", "compare"} <= loading
    for name, _, a in _options(cli.build_parser()):
        if name in loading and a.dest == "layout":
            assert tuple(a.choices) == ("stacked", "unstacked", "auto") and a.default == "auto", name
            loading.discard(name)
    assert not loading, f"no --layout on {sorted(loading)}"
    seen = []

    def loader(path, dtype=None, attn_impl="xla", layer_unroll=1, layout="auto"):
        seen.append(layout)
        raise FileNotFoundError(f"model folder {path} does not exist")

    monkeypatch.setattr(cli, "load_model_with_tokenizer", loader)
    for cmd in (["trace"], ["edit", "--layer", "1"], ["eval"], ["demo"]):
        rc, _, err = run(cmd + ["--layout", "unstacked", "--out", str(tmp_path)], capsys)
        assert_one_line_error(rc, err, "does not exist")
    assert seen == ["unstacked"] * 4
    rc, _, err = run(["trace", "--layout", "rolled"], capsys)
    assert_one_line_error(rc, err, "argument --layout: invalid choice: 'rolled'")


@pytest.mark.slow  # optimized_compile: running the gate's 800 calibration rows dominates, not compiling
def test_edit_then_eval_with_memory_and_a_mismatched_model(tiny_llada_dir, tiny_llada_var_dir, tmp_path, capsys,
                                                          optimized_compile):
    rc, out, err = run(["edit", "--model", tiny_llada_dir, "--layer", "1", "--limit", "3", "--out", str(tmp_path),
                        "--no-progress"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["n_facts"] == 3 and info["coordinate"]["layer"] == 1
    mem = tmp_path / "memory.npz"
    rc, out, err = run(["eval", "--model", tiny_llada_dir, "--memory", str(mem), "--out", str(tmp_path)]
                       + FAST_EVAL, capsys)
    assert rc == 0, err
    saved = json.loads((tmp_path / "eval_forget01.json").read_text())
    assert saved["memory"] == str(mem) and "forget_lp" in out
    # the same file on another model: refused by fingerprint, in one line
    rc, _, err = run(["eval", "--model", tiny_llada_var_dir, "--memory", str(mem), "--out", str(tmp_path)]
                     + FAST_EVAL, capsys)
    assert_one_line_error(rc, err, "edit memory was built for model")
    # a file that is not a memory
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    rc, _, err = run(["eval", "--model", tiny_llada_dir, "--memory", str(junk)] + FAST_EVAL, capsys)
    assert_one_line_error(rc, err, "corrupt or truncated edit-memory file")
    rc, _, err = run(["eval", "--model", tiny_llada_dir, "--memory", str(tmp_path / "none.npz")] + FAST_EVAL, capsys)
    assert_one_line_error(rc, err, "does not exist")


@pytest.fixture(scope="module")
def tiny(tiny_tofu_llada):
    return tiny_tofu_llada


@pytest.mark.slow
def test_eval_with_retain_cache(tiny, tmp_path, capsys):
    params, cfg, tok = tiny
    retain_params = init_params(jax.random.PRNGKey(1), cfg)
    target_dir, retain_dir = tmp_path / "target", tmp_path / "retain"
    target_dir.mkdir()
    retain_dir.mkdir()
    write_reference_info(retain_dir, "retain99")  # a forget01 reference
    calls = []

    def loader(path):
        calls.append(str(path))
        return (retain_params if str(path) == str(retain_dir) else params), cfg, tok

    out = tmp_path / "results"
    argv = ["--split", "forget01", "--model", str(target_dir), "--retain-model", str(retain_dir),
            "--metrics", "forget_lp", "forget_quality", "--n-mc", "2", "--seeds", "0", "--limit", "3",
            "--out", str(out), "--no-progress", "--gen-length", "4", "--length-bucket", "192",
            "--batch-size", "8"]
    args = cli.build_eval_parser().parse_args(argv)
    res = cli.run_eval(args, loader=loader)
    assert calls == [str(retain_dir), str(target_dir)]
    cache = retain_tr_cache_path(out, "forget01", 2)
    retain = load_retain_tr(cache)
    assert set(retain) == {"0"} and set(retain["0"]) == {"6", "20", "33"}  # 3 rows spread over 40
    mine = [v["score"] for v in res["per_seed"]["0"]["forget_tr"]["value_by_index"].values()]
    assert res["metrics"]["forget_quality"][0] == pytest.approx(M.forget_quality(mine, list(retain["0"].values())))
    saved = json.loads((out / "eval_forget01.json").read_text())
    assert saved["metrics"] == res["metrics"]
    assert (out / "eval_forget01_summary.md").is_file()
    assert "forget_quality" in capsys.readouterr().out
    # second run: the retain TRs come from the cache, the retain model is not loaded again
    calls.clear()
    cli.run_eval(args, loader=loader)
    assert calls == [str(target_dir)]
    assert saved["reference"]["retain_split"] == "retain99" and saved["reference_override"] is False
    assert "trained on retain99" in (out / "eval_forget01_summary.md").read_text()
    # the same retain99 reference for forget05 is refused, naming the split and both retain sets ...
    argv5 = [x if x != "forget01" else "forget05" for x in argv]
    with pytest.raises(ReferenceMismatchError, match=r"forget05: .* trained on retain99, .* needs a model trained on retain95"):
        cli.run_eval(cli.build_eval_parser().parse_args(argv5), loader=loader)
    # ... unless overridden, which the report records
    res5 = cli.run_eval(cli.build_eval_parser().parse_args(argv5 + ["--reference-override"]), loader=loader)
    assert res5["reference_override"] is True and res5["reference"]["retain_split"] == "retain99"
    assert res5["metrics"]["forget_quality"][0] is not None
    assert "reference_override: true" in (out / "eval_forget05_summary.md").read_text()


# the real command, without and with --debug, on a missing folder inside each process's own folder;
# started right after collection (conftest.EarlyProcess), beside the in-process tests
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
CLI_PLAIN = EarlyProcess(__name__, "cli_plain", lambda d: [sys.executable, "-m", "timerome_jax.cli", "eval", "--model",
                                                           os.path.join(d, "nope")], env=_ENV, timeout=300)
CLI_DEBUG = EarlyProcess(__name__, "cli_debug", lambda d: [sys.executable, "-m", "timerome_jax.cli", "--debug", "eval",
                                                           "--model", os.path.join(d, "nope")], env=_ENV, timeout=300)


@pytest.fixture(scope="module")
def cli_plain():
    return CLI_PLAIN.result(), os.path.join(CLI_PLAIN.dir, "nope")


@pytest.fixture(scope="module")
def cli_debug():
    return CLI_DEBUG.result()


@pytest.mark.slow
def test_installed_command_exit_status_and_stderr(cli_plain, cli_debug):
    r, nope = cli_plain
    assert r.returncode == 1
    assert r.stderr == f"error: model folder {nope} does not exist\n"
    r = cli_debug
    assert r.returncode != 0 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr
