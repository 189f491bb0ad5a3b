"""experiments/full_protocol.py: explicit per-split references are parsed and checked against the
retain set they record before any evaluation starts."""
import sys
from pathlib import Path

import pytest

from timerome_jax.tofu.models import write_reference_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from full_protocol import main, parse_references  # noqa: E402


def _ref(tmp_path, name, retain):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    write_reference_info(d, retain)
    return d


def test_parse_references(tmp_path):
    d = _ref(tmp_path, "r95", "retain95")
    assert parse_references([f"forget05={d}"]) == {"forget05": str(d)}
    for bad in ([f"forget07={d}"], [str(d)], [f"forget05={d}", f"forget05={d}"], [f"forget05={tmp_path}/none"]):
        with pytest.raises(SystemExit):
            parse_references(bad)


def test_mismatched_reference_is_an_error_before_any_work(tmp_path):
    d = _ref(tmp_path, "r90", "retain90")
    with pytest.raises(SystemExit, match="trained on retain90, but forget05's Forget Quality needs"):
        main(["--out", str(tmp_path / "out"), "--splits", "forget05", "--reference", f"forget05={d}"])
    with pytest.raises(SystemExit, match="not among --splits"):
        main(["--out", str(tmp_path / "out"), "--splits", "forget01", "--reference",
              f"forget05={_ref(tmp_path, 'r95', 'retain95')}"])
