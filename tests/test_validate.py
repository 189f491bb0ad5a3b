"""`timerome validate`: the library against a checkpoint's own PyTorch code, on tiny checkpoints in
each family's real layout. LLaDA folders get remote-code modeling files written here (a thin
transformers wrapper around the faithful `torch_ref` model); Dream/DiffuLLaMA folders use
transformers' built-in Qwen2/Llama classes. A folder whose code disagrees with the library fails."""
import json
import os
import shutil

import jax
import pytest

from timerome_jax.backbone import validate as V

CONFIG_PY = '''
from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
'''

# A transformers wrapper around torch_ref's LLaDA: same parameter names as the official
# modeling_llada.py, hidden states in the transformers convention. THETA_SCALE = 1.0 is faithful;
# the "corrupted" folder sets another value (code that disagrees with the weights' true RoPE).
MODELING_PY = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from timerome_jax.torch_ref.llada import LLaDAArgs, LLaDAModel

from .configuration_llada import LLaDAConfig

THETA_SCALE = {theta_scale}


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        a = LLaDAArgs(config.to_dict())
        a.rope_theta = a.rope_theta * THETA_SCALE
        self.model = LLaDAModel(a)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kw):
        t = self.model.transformer
        x = t.wte(input_ids)
        bias = None
        if attention_mask is not None:
            m = attention_mask.to(torch.bool)[:, None, None, :]
            bias = torch.zeros(m.shape, dtype=x.dtype).masked_fill(~m, torch.finfo(x.dtype).min)
        hs = []
        for block in t.blocks:
            hs.append(x)
            x = block(x, bias)
        x = t.ln_f(x)
        hs.append(x)
        logits = torch.nn.functional.linear(x, t.wte.weight) if self.model.a.weight_tying else t.ff_out(x)
        return CausalLMOutputWithPast(logits=logits, hidden_states=tuple(hs) if output_hidden_states else None)
'''


# The same model written the way the official LLaDA files are (for transformers 4.x): no
# post_init (so no all_tied_weights_keys under transformers 5), tie_weights(self) without keyword
# arguments, forward reading config.use_cache, and the inner model built with init_device "cuda".
LEGACY_PY = MODELING_PY.replace("from timerome_jax.torch_ref.llada import LLaDAArgs, LLaDAModel",
                                "from timerome_jax.torch_ref.llada import LLaDAArgs, LLaDAModel as RefModel")
LEGACY_PY = LEGACY_PY.replace('''        self.model = LLaDAModel(a)
        self.post_init()''', '''        config.init_device = "cuda"
        self.model = LLaDAModel(config, a)

    def tie_weights(self):
        pass''').replace("    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kw):\n",
                        "    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kw):\n"
                        "        assert self.config.use_cache is False\n")
LEGACY_PY += '''

class LLaDAModel(RefModel):
    def __init__(self, config, a):
        torch.empty(1, device=config.init_device)  # the official code allocates on init_device
        super().__init__(a)
'''


def with_remote_code(src, dst, theta_scale=1.0, legacy=False):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "configuration_llada.py"), "w") as f:
        f.write(CONFIG_PY)
    with open(os.path.join(dst, "modeling_llada.py"), "w") as f:
        f.write((LEGACY_PY if legacy else MODELING_PY).format(theta_scale=theta_scale))
    return str(dst)


def check(report, passed):
    assert report["passed"] is passed, "\n".join(V.summary_lines(report))
    assert set(report["cases"]) == {"unpadded", "padded"}
    assert all(len(c["hidden"]) == report["n_layers"] + 1 for c in report["cases"].values())


@pytest.mark.slow  # loads the folder through transformers remote code
def test_llada_remote_code_passes(tiny_llada_dir, tmp_path):
    folder = with_remote_code(tiny_llada_dir, tmp_path / "llada")
    r = V.validate(folder)
    check(r, True)
    assert r["torch"].startswith("remote code modeling_llada.LLaDAModelLM") and r["max_rel_err"] < 1e-5
    assert set(V.validate(folder, cases=("unpadded",))["cases"]) == {"unpadded"}


def test_official_style_code_for_transformers_4_is_shimmed(tiny_llada_dir, tmp_path):
    import torch
    from transformers import PretrainedConfig

    r = V.validate(with_remote_code(tiny_llada_dir, tmp_path / "legacy", legacy=True), cases=("unpadded",))
    assert r["passed"] and r["max_rel_err"] < 1e-5, "\n".join(V.summary_lines(r))
    want = {"tie_weights(**kw)", "all_tied_weights_keys={}"}
    if not hasattr(PretrainedConfig(), "use_cache"):
        want.add("use_cache=False")
    if not torch.cuda.is_available():
        want.add("init_device cuda->cpu")
    assert set(r["torch"].split("shims: ")[1].split(", ")) == want


@pytest.mark.slow
def test_llada_variant_gqa_bias_tied_passes(tiny_llada_var_dir, tmp_path):
    check(V.validate(with_remote_code(tiny_llada_var_dir, tmp_path / "var")), True)


@pytest.mark.parametrize("fixture", ["tiny_dream_dir", pytest.param("tiny_diffullama_dir", marks=pytest.mark.slow)])
def test_qwen2_llama_families_pass_with_builtin_classes(fixture, request):
    r = V.validate(request.getfixturevalue(fixture))
    check(r, True)
    assert r["torch"].startswith("transformers ") and r["max_rel_err"] < 1e-5
    assert r["layout"] == ("unstacked" if jax.default_backend() == "gpu" else "stacked")  # auto
    u = V.validate(request.getfixturevalue(fixture), cases=("padded",), layout="unstacked")
    assert u["passed"] and u["layout"] == "unstacked" and u["max_rel_err"] < 1e-5


def test_code_that_disagrees_fails_and_cli_exits_nonzero(tiny_llada_dir, tmp_path, capsys):
    from timerome_jax.cli import main

    bad = with_remote_code(tiny_llada_dir, tmp_path / "bad", theta_scale=2.0)
    r = V.validate(bad)
    check(r, False)
    assert r["cases"]["padded"]["hidden"][0] < 1e-6 < r["cases"]["padded"]["hidden"][1]  # embeddings agree
    with pytest.raises(SystemExit) as e:
        main(["validate", "--model", bad, "--out", str(tmp_path / "report.json")])
    assert e.value.code == 1
    assert "FAIL" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is False


def test_folder_without_modeling_code_is_a_clear_error(tiny_llada_dir):
    with pytest.raises(V.ValidationError, match="auto_map"):
        V.validate(tiny_llada_dir)
