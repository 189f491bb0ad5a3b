"""The public API (`timerome_jax.__init__`): docs/quickstart.py, the README's quick start, runs as
written on the packaged model, uses nothing but `import timerome_jax`, and the edit it installs lowers
the forget-set likelihood."""
import ast
import runpy
from pathlib import Path
import pytest

import timerome_jax as tj

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.py"


def test_every_public_name_exists():
    missing = [n for n in tj.__all__ if not hasattr(tj, n)]
    assert not missing
    assert issubclass(tj.MDLM, __import__("flax").nnx.Module)


def test_quickstart_uses_only_the_public_api():
    tree = ast.parse(QUICKSTART.read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [(a.name, a.asname) for n in imports for a in n.names] == [("timerome_jax", "tj")]
    assert all(isinstance(n, ast.Import) for n in imports)
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "tj"}
    assert used and used <= set(tj.__all__), used - set(tj.__all__)


@pytest.mark.slow
def test_quickstart_runs_as_written(capsys):
    ns = runpy.run_path(str(QUICKSTART), run_name="__main__")
    out = capsys.readouterr().out
    assert "edit at Coordinate(" in out and "before:" in out and "after:" in out
    assert "| timerome |" in out and "| no_edit | ref |" in out
    cfg, coord, memory = ns["cfg"], ns["coord"], ns["memory"]
    assert 0 <= coord.layer < cfg.n_layers and tj.MODULES[coord.module] in tj.MODULES
    assert int(memory.active.sum()) == len(ns["facts"]) == 40
    res = ns["results"]
    assert res["timerome"]["metrics"]["forget_lp"][0] < res["no_edit"]["metrics"]["forget_lp"][0]
