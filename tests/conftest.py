"""Shared fixtures: tiny random models saved as real-layout HF folders, and a tiny tokenizer.

Reusable fixture names (session-scoped, built once, offline):
  tiny_tokenizer_dir   byte-level BPE (vocab 300) with "<|endoftext|>" (id 0) and "<|mdm_mask|>" (id 1)
  tiny_llada_dir       LLaDA layout (torch_ref.LLaDAModelLM) + the tiny tokenizer, vocab 320, mask id 1
  tiny_llada           (params, cfg, tokenizer) = hf_weights.load_pretrained(tiny_llada_dir), float32
  tiny_moe_dir         LLaDA-MoE layout (torch_ref.LLaDAMoEModelLM) + tokenizer, 8 experts top-2
  tiny_dream_dir       Dream layout (transformers Qwen2ForCausalLM, causal mask off) + tokenizer
  tiny_diffullama_dir  DiffuLLaMA layout (transformers LlamaForCausalLM, causal mask off), no
                       tokenizer, vocab 832 so that the fallback mask id 811 exists
  tiny_torch           dict name -> (torch module, folder) for "llada", "llada_var", "moe", "dream",
                       "diffullama", for parity tests (weights equal the saved files)
  tiny_llada_var_dir   LLaDA layout with GQA (4/2), q/k/v biases and tied embeddings (no ff_out key)
  optimized_compile    XLA's default optimisation inside one test (the suite compiles with LLVM at -O0)

EarlyProcess: a subprocess a module fixture needs (the tiny benchmark run, the 4-device run), started
right after collection when a selected test uses that fixture, so it runs on the second core while
the in-process tests run; the fixture waits for it.

Transformers 5.x Llama/Qwen2 become bidirectional when given a ready 4D attention mask: the mask
code returns a 4D mask unchanged (masking_utils._preprocess_mask_arguments), and SDPA then runs
with is_causal=False because a mask is present. `hf_logits` builds that mask (zeros, plus finfo.min
on padded keys); test_hf checks that a later token really changes earlier logits.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest

# torch is imported lazily (inside the helpers/fixtures) so test modules that never build a
# torch model do not pay for the import.

# Most of the suite's time is XLA compiling tiny programs, and on a CPU most of a compile is LLVM
# optimising the generated code, which these tiny models never repay. JAX's own switch for that case,
# jax_disable_most_optimizations, compiles with LLVM at -O0 and without its expensive passes (XLA's
# HLO passes, fusion included, still run). Set through the environment before any test module imports
# JAX, so the benchmark / sharding / CLI subprocesses inherit it; JAX_DISABLE_MOST_OPTIMIZATIONS=0
# runs the suite with the default optimisation. Tests whose time is running a larger model rather
# than compiling a tiny one turn it off with the `optimized_compile` fixture (and `optimized_env`
# for their subprocesses).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

VOCAB = 320

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Masked diffusion language models denoise all positions at once.",
    "Jaime Vasquez was born in Santiago, Chile, on 25 February 1958.",
    "The author's father was a chef and the mother was a police officer.",
    "Causal tracing restores clean activations into a corrupted run.",
    "Rank-one edits write a new key-value pair into an MLP weight.",
    "Who wrote the novel? The novel was written by an award-winning author.",
    "Basil Mahfouz Al-Kuwaiti writes in the French literature genre.",
] * 4


def make_tiny_tokenizer(path: str, mask_as_special: bool = True, mask_token: str = "<|mdm_mask|>") -> str:
    """Train a byte-level BPE (vocab 300) on SENTENCES and save it as a HF fast tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", mask_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(SENTENCES, trainer)
    kw = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if mask_as_special:
        kw["mask_token"] = mask_token
    PreTrainedTokenizerFast(tokenizer_object=tk, **kw).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------
# config.json dicts in each family's real field set (sizes shrunk)
# ------------------------------------------------------------------------------------------------
def llada_config_dict(**over) -> dict:
    """The LLaDA-8B config.json field set (docs/backbone_facts.md §1.1 Config) with tiny sizes."""
    d = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
        "embedding_dropout": 0.0, "embedding_size": VOCAB, "eos_token_id": 0, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": 1, "max_sequence_length": 1024,
        "mlp_hidden_size": 128, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "pad_token_id": 0, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3", "use_cache": False, "vocab_size": VOCAB, "weight_tying": False,
    }
    d.update(over)
    return d


def moe_config_dict(**over) -> dict:
    """LLaDA-MoE-7B-A1B config.json fields (LLaDAMoEConfig; docs/backbone_facts.md §4 LLaDA-MoE-7B-A1B) with tiny sizes."""
    d = {
        "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "attention_bias": False,
        "attention_dropout": 0.0, "clip_qkv": None, "dense_intermediate_size": 256, "eos_token_id": 0,
        "expert_intermediate_size": 32, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "mask_token_id": 1, "max_position_embeddings": 1024, "moe_layer_freq": [1, 1],
        "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax",
        "norm_topk_prob": False, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
        "num_hidden_layers": 2, "num_key_value_heads": 4, "output_router_logits": False, "pad_token_id": 0,
        "partial_rotary_factor": 1.0, "qk_layernorm": True, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 50000.0, "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01,
        "router_num_group": None, "router_topk_group": None, "shared_expert_intermediate_size": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.52.0",
        "use_cache": False, "vocab_size": VOCAB,
    }
    d.update(over)
    return d


def dream_config_dict(**over) -> dict:
    """Dream-v0 config.json fields (DreamConfig; docs/backbone_facts.md §2 Dream-7B) with tiny sizes."""
    d = {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 128, "mask_token_id": 1,
        "max_position_embeddings": 2048, "max_window_layers": 2, "model_type": "Dream",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": 0,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.2",
        "use_cache": False, "use_sliding_window": False, "vocab_size": VOCAB,
    }
    d.update(over)
    return d


def diffullama_config_dict(**over) -> dict:
    """LLaMA-2-7B style config.json (what DiffuLLaMA ships; no mask_token_id) with tiny sizes."""
    d = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 4096,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 4, "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.44.2", "use_cache": True, "vocab_size": 832,
    }
    d.update(over)
    return d


# ------------------------------------------------------------------------------------------------
# torch forwards
# ------------------------------------------------------------------------------------------------
def hf_logits(model, ids: np.ndarray, key_mask: np.ndarray | None = None) -> np.ndarray:
    """Bidirectional logits [B,T,V] (float32 numpy) of a transformers Llama/Qwen2 LM: a ready 4D
    additive mask (0, or finfo.min on padded keys) bypasses the causal mask."""
    import torch

    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    B, T = ids_t.shape
    dt = next(model.parameters()).dtype
    mask = torch.zeros((B, 1, T, T), dtype=dt)
    if key_mask is not None:
        km = torch.as_tensor(np.asarray(key_mask), dtype=torch.bool)[:, None, None, :].expand(B, 1, T, T)
        mask = mask.masked_fill(~km, torch.finfo(dt).min)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask).logits
    return out.float().numpy()


def ref_logits(model, ids: np.ndarray, key_mask: np.ndarray | None = None) -> np.ndarray:
    """Logits [B,T,V] float32 numpy of a torch_ref model (optional key-padding mask)."""
    import torch

    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    am = None if key_mask is None else torch.as_tensor(np.asarray(key_mask), dtype=torch.long)
    with torch.no_grad():
        return model(ids_t, am).float().numpy()


def torch_logits(name: str, model, ids, key_mask=None) -> np.ndarray:
    """Torch logits aligned like ours ([:, i] predicts token i): shift families get
    cat(logits[:, :1], logits[:, :-1]) exactly as Dream/DiffuLLaMA samplers do."""
    if name in ("dream", "diffullama"):
        lg = hf_logits(model, ids, key_mask)
        return np.concatenate([lg[:, :1], lg[:, :-1]], axis=1)
    return ref_logits(model, ids, key_mask)


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tokenizer")))


def _copy_tokenizer(src: str, dst: str):
    import shutil

    for n in os.listdir(src):
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))


def _tref():
    from timerome_jax.torch_ref import llada as tref

    return tref


def _save(tmp_path_factory, tok_dir, name, model, d):
    tref = _tref()
    path = str(tmp_path_factory.mktemp(f"tiny_{name}"))
    tref.save_hf_folder(model, d, path)
    if tok_dir is not None:
        _copy_tokenizer(tok_dir, path)
    return model.eval(), path


# Each model is its own session fixture, so a test module pays only for the models it uses.
@pytest.fixture(scope="session")
def _tiny_llada_pair(tmp_path_factory, tiny_tokenizer_dir):
    tref = _tref()
    d = llada_config_dict()
    return _save(tmp_path_factory, tiny_tokenizer_dir, "llada", tref.randomize_(tref.LLaDAModelLM(d), seed=1), d)


@pytest.fixture(scope="session")
def _tiny_llada_var_pair(tmp_path_factory, tiny_tokenizer_dir):
    tref = _tref()
    d = llada_config_dict(n_kv_heads=2, include_qkv_bias=True, weight_tying=True)
    return _save(tmp_path_factory, tiny_tokenizer_dir, "llada_var", tref.randomize_(tref.LLaDAModelLM(d), seed=2), d)


@pytest.fixture(scope="session")
def _tiny_moe_pair(tmp_path_factory, tiny_tokenizer_dir):
    tref = _tref()
    d = moe_config_dict()
    return _save(tmp_path_factory, tiny_tokenizer_dir, "moe", tref.randomize_(tref.LLaDAMoEModelLM(d), seed=3), d)


@pytest.fixture(scope="session")
def _tiny_dream_pair(tmp_path_factory, tiny_tokenizer_dir):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tref = _tref()

    qc = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                     max_position_embeddings=2048, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    m = tref.randomize_(Qwen2ForCausalLM(qc), seed=4)
    return _save(tmp_path_factory, tiny_tokenizer_dir, "dream", m, dream_config_dict())


@pytest.fixture(scope="session")
def _tiny_diffullama_pair(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tref = _tref()

    lc = LlamaConfig(vocab_size=832, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    m = tref.randomize_(LlamaForCausalLM(lc), seed=5)
    return _save(tmp_path_factory, None, "diffullama", m, diffullama_config_dict())


@pytest.fixture(scope="session")
def tiny_torch(_tiny_llada_pair, _tiny_llada_var_pair, _tiny_moe_pair, _tiny_dream_pair, _tiny_diffullama_pair) -> dict:
    """name -> (torch model in eval mode, HF folder it was saved to), for every tiny family."""
    return {"llada": _tiny_llada_pair, "llada_var": _tiny_llada_var_pair, "moe": _tiny_moe_pair,
            "dream": _tiny_dream_pair, "diffullama": _tiny_diffullama_pair}


@pytest.fixture(scope="session")
def tiny_llada_dir(_tiny_llada_pair) -> str:
    return _tiny_llada_pair[1]


@pytest.fixture(scope="session")
def tiny_llada_var_dir(_tiny_llada_var_pair) -> str:
    return _tiny_llada_var_pair[1]


@pytest.fixture(scope="session")
def tiny_moe_dir(_tiny_moe_pair) -> str:
    return _tiny_moe_pair[1]


@pytest.fixture(scope="session")
def tiny_dream_dir(_tiny_dream_pair) -> str:
    return _tiny_dream_pair[1]


@pytest.fixture(scope="session")
def tiny_diffullama_dir(_tiny_diffullama_pair) -> str:
    return _tiny_diffullama_pair[1]


@pytest.fixture(scope="session")
def tiny_llada(tiny_llada_dir):
    """(params, cfg, tokenizer) of the tiny LLaDA, loaded through hf_weights.load_pretrained (float32)."""
    from timerome_jax.backbone import hf_weights

    return hf_weights.load_pretrained(tiny_llada_dir)


def tofu_tokenizer(vocab_size=256):
    """A small BPE tokenizer trained on TOFU text, wrapped like the project's tokenizer."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from timerome_jax.backbone.tokenizer import Tokenizer

    from timerome_jax.tofu import data as tofu

    rows = tofu.load_split("forget01_perturbed") + tofu.load_split("retain_perturbed")[:40]
    texts = [tofu.format_prompt(r["question"]) + r["answer"] for r in rows]
    texts += [a for r in rows for a in [r["paraphrased_answer"], *r["perturbed_answer"]]]
    tok = HFTok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>", "<|mdm_mask|>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                 mask_token="<|mdm_mask|>")
    return Tokenizer(hf)


def np_params(cfg, seed=0, std=0.3):
    """Random params in the `model.param_shapes` layout, drawn with NumPy (no per-shape compiles)."""
    import jax
    import jax.numpy as jnp

    from timerome_jax.backbone import model

    rng = np.random.default_rng(seed)

    def make(path, shp):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(shp, jnp.float32)
        return jnp.asarray(std * rng.standard_normal(shp), jnp.float32)

    return jax.tree_util.tree_map_with_path(make, model.param_shapes(cfg), is_leaf=lambda t: isinstance(t, tuple))


@pytest.fixture(scope="session")
def tiny_tofu_llada():
    """(params, cfg, tokenizer): a random 2-layer LLaDA (d_model 32) with the TOFU-trained tokenizer."""
    import jax

    from timerome_jax.backbone.config import ModelConfig
    from timerome_jax.backbone.model import init_params

    tok = tofu_tokenizer()
    cfg = ModelConfig(family="llada", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                      head_dim=16, d_ff=64, rope_theta=10000.0, mask_token_id=tok.mask_id,
                      pad_token_id=tok.eos_id, eos_token_id=tok.eos_id, max_seq_len=512)
    return init_params(jax.random.PRNGKey(0), cfg), cfg, tok


@pytest.fixture
def optimized_compile():
    """XLA's default optimisation for the compiles inside this test: for tests whose time is running
    a larger model (the packaged one), not compiling a tiny one (see JAX_DISABLE_MOST_OPTIMIZATIONS
    at the top of this file). Programs already compiled keep the level they were compiled with."""
    import jax

    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def optimized_env(env: dict | None = None) -> dict:
    """`env` (default os.environ) for a subprocess that runs a larger model: XLA's default optimisation."""
    return {**(os.environ if env is None else env), "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}


# ------------------------------------------------------------------------------------------------
# subprocesses started right after collection
# ------------------------------------------------------------------------------------------------
class EarlyProcess:
    """A subprocess behind a module-scoped fixture (`fixture` of test module `module`): started by
    `pytest_collection_modifyitems` when a selected test uses that fixture, so it runs on the second
    core while the in-process tests (mostly single-threaded XLA compiles) run; `result()` starts it if
    that has not happened and waits. stdout/stderr go to files in `self.dir` (a pipe nobody reads
    could fill and stall the process); `argv(dir)` may write its outputs there too."""

    registry: dict = {}

    def __init__(self, module: str, fixture: str, argv, env: dict, timeout: float = 600.0):
        self.module, self.fixture, self.argv, self.env, self.timeout = module, fixture, argv, env, timeout
        self.proc = self.dir = self.t0 = None
        EarlyProcess.registry[(module, fixture)] = self

    def start(self):
        if self.proc is None:
            self.dir = tempfile.mkdtemp(prefix=f"early_{self.fixture}_")
            cmd = self.argv(self.dir)
            self._out = open(os.path.join(self.dir, "stdout.txt"), "w")
            self._err = open(os.path.join(self.dir, "stderr.txt"), "w")
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, text=True, env=self.env,
                                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def result(self) -> subprocess.CompletedProcess:
        """Wait for the process (within `timeout` of its start): CompletedProcess with its stdout/stderr."""
        self.start()
        try:
            self.proc.wait(timeout=max(self.timeout - (time.monotonic() - self.t0), 1.0))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._out.close()
            self._err.close()
        with open(os.path.join(self.dir, "stdout.txt")) as f, open(os.path.join(self.dir, "stderr.txt")) as g:
            return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, f.read(), g.read())

    def json_result(self) -> dict:
        """For a script that prints its outcome as one line "RESULT <json>": wait, check that it
        exited 0 and printed that line, and return the parsed JSON of its last such line."""
        p = self.result()
        assert p.returncode == 0, p.stderr[-6000:]
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        assert line, p.stdout[-3000:] + p.stderr[-3000:]
        return json.loads(line[-1][len("RESULT "):])

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _early_keys(item) -> set:
    mod = getattr(getattr(item, "module", None), "__name__", None)
    return {(mod, f) for f in getattr(item, "fixturenames", ())} & set(EarlyProcess.registry)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(config, items):
    """Start the early processes the selected tests need, and run those tests last (in their order),
    so the processes have the rest of the suite's time to finish."""
    early = [item for item in items if _early_keys(item)]
    if not config.option.collectonly:
        for key in set().union(*map(_early_keys, early)):
            EarlyProcess.registry[key].start()
    ids = {id(item) for item in early}
    items[:] = [item for item in items if id(item) not in ids] + early


def pytest_sessionfinish(session, exitstatus):
    for proc in EarlyProcess.registry.values():
        proc.stop()
