"""checkpoint.py + convert/to_orbax.py: Orbax round trips, explicit shardings, the HF/Orbax loader."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import to_orbax
from timerome_jax.backbone import checkpoint
from timerome_jax.backbone import model
from timerome_jax.backbone.checkpoint import OrbaxCheckpointError


def _equal(a, b, dtype=None):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        y = y if dtype is None else jnp.asarray(y).astype(dtype)
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=str(p))


@pytest.mark.slow
def test_save_restore_round_trip(tiny_llada, tmp_path):
    params, cfg, tok = tiny_llada
    out = str(tmp_path / "ck")
    checkpoint.save(params, cfg, out, tokenizer=tok)
    assert sorted(os.listdir(out)) == ["params", "timerome_config.json", "tokenizer"]
    assert [n for n in os.listdir(tmp_path) if n != "ck"] == []  # temp folder renamed away
    p2, c2, t2 = checkpoint.restore(out)
    _equal(p2, params)
    assert c2 == cfg
    assert t2.encode("lazy dog") == tok.encode("lazy dog") and t2.mask_id == cfg.mask_token_id
    dev = jax.devices()[0]
    assert all(x.sharding == jax.sharding.SingleDeviceSharding(dev) for x in jax.tree.leaves(p2))
    ids = jnp.arange(2, 34, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(model.forward(p2, ids, c2), model.forward(params, ids, cfg))


def test_restore_with_explicit_sharding(tiny_llada, tmp_path):
    params, cfg, _ = tiny_llada
    out = str(tmp_path / "ck")
    checkpoint.save(params, cfg, out)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p2, _, tok = checkpoint.restore(out, sharding=rep)
    assert tok is None
    assert all(x.sharding == rep for x in jax.tree.leaves(p2))
    # a per-leaf tree of shardings: the embedding split along the vocab axis on the 1-device mesh
    tree = jax.tree.map(lambda _: rep, params)
    tree["embed"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    p3, _, _ = checkpoint.restore(out, sharding=tree)
    assert p3["embed"].sharding == tree["embed"]
    _equal(p3, params)
    with pytest.raises(ValueError, match="pytree of Shardings"):
        checkpoint.restore(out, sharding={"embed": rep})


def test_convert_cli_bf16_and_load_model(tiny_llada_dir, tiny_llada, tmp_path, capsys):
    params, cfg, tok = tiny_llada
    out = str(tmp_path / "conv")
    assert to_orbax.main([tiny_llada_dir, out, "--dtype", "bfloat16"]) == 0
    assert "converted" in capsys.readouterr().out
    meta = json.load(open(os.path.join(out, "timerome_config.json")))
    assert meta["param_dtype"] == "bfloat16" and meta["config"]["family"] == "llada"
    for name in ("tokenizer.json", "tokenizer_config.json"):  # verbatim copies
        assert open(os.path.join(out, "tokenizer", name), "rb").read() == \
            open(os.path.join(tiny_llada_dir, name), "rb").read()
    p2, c2, t2 = checkpoint.load_model(out)
    assert c2 == cfg.replace(dtype="bfloat16")
    _equal(p2, params, dtype=jnp.bfloat16)
    # restoring into float32 upcasts exactly
    p3, c3, _ = checkpoint.restore(out, dtype="float32")
    _equal(p3, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params))
    assert c3.dtype == "float32"
    # load_model on the HF folder gives what load_pretrained gives
    p4, c4, t4 = checkpoint.load_model(tiny_llada_dir, attn_impl="xla")
    _equal(p4, params)
    assert c4 == cfg and t4.mask_id == tok.mask_id
    # converting again refuses to overwrite unless asked
    assert to_orbax.main([tiny_llada_dir, out]) == 2
    assert "exists" in capsys.readouterr().err
    assert to_orbax.main([tiny_llada_dir, out, "--overwrite"]) == 0
    assert checkpoint.read_meta(out)[1] == "float32"


def test_convert_cli_reports_bad_input(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    assert to_orbax.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_bad_folders(tmp_path, tiny_llada):
    with pytest.raises(OrbaxCheckpointError, match="neither a converted checkpoint"):
        checkpoint.load_model(str(tmp_path))
    with pytest.raises(OrbaxCheckpointError, match="no timerome_config.json"):
        checkpoint.restore(str(tmp_path))
    params, cfg, _ = tiny_llada
    out = str(tmp_path / "ck")
    checkpoint.save(params, cfg, out)
    meta = os.path.join(out, "timerome_config.json")
    d = json.load(open(meta))
    d["config"]["d_ff"] = 256  # config no longer matches the stored arrays
    json.dump(d, open(meta, "w"))
    with pytest.raises(OrbaxCheckpointError, match=r"params\['layers'\]\['w_down'\] is stored with shape \(2, 128, 64\), the stored config expects \(2, 256, 64\)"):
        checkpoint.restore(out)
    d["config"]["not_a_field"] = 1
    json.dump(d, open(meta, "w"))
    with pytest.raises(OrbaxCheckpointError, match="not_a_field"):
        checkpoint.restore(out)
    with pytest.raises(OrbaxCheckpointError, match="do not match param_shapes"):
        checkpoint.save(params, cfg.replace(d_ff=256), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")
