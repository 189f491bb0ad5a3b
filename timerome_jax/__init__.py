"""timerome-jax: TimeROME-DLM (TIE causal tracing + closed-form edit memory) for masked diffusion LMs.

The public API, along the data flow (docs/quickstart.py runs it end to end):

    params, cfg, tok = load_model(DEFAULT_MODEL)                   # HF or converted folder
    facts  = load_facts(tok, "forget01", tok.eos_id)                # TOFU rows -> facts
    result = trace_facts(params, cfg, facts, TraceConfig())         # Stage 1: TIE heatmaps
    coord, score = select(result.tie_bar)                           # Stage 2: (layer, step, module)
    memory, info = install(params, cfg, tok, facts, coord, 0.5, 2)  # Stage 3: EditMemory (Eq. 10-12)
    edited = Intervene(edit=memory)                                 # the edit, as data
    generate_text(params, cfg, tok, prompts, 64, SamplerConfig(), intervene=edited)
    evaluate(params, cfg, tok, "forget01", intervene=edited)        # TOFU metrics
    compare({"no_edit": before, "timerome": after})                 # CIs, paired tests

`MDLM` is the same backbone as a Flax NNX module (same arrays, same forward).
Also: `screen_and_trace` / `select_screened` (first-order TIE screen + exact TIE on the top cells),
`unstack` (per-layer weight arrays: the batch-1 generation layout), `validate` (the library against
a checkpoint's own PyTorch code).
"""
import os as _os

# we use transformers only for tokenizers and configs: its "PyTorch was not found" advice is noise
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

from timerome_jax.backbone.checkpoint import load_model, load_model_with_tokenizer  # noqa: E402
from timerome_jax.backbone.config import MODULES, ModelConfig  # noqa: E402
from timerome_jax.backbone.hf_weights import load_pretrained, save_pretrained  # noqa: E402
from timerome_jax.backbone.intervene import Intervene, Patch  # noqa: E402
from timerome_jax.backbone.model import forward, init_params, run, stack, unstack  # noqa: E402
from timerome_jax.backbone.nnx import MDLM  # noqa: E402
from timerome_jax.backbone.validate import validate  # noqa: E402
from timerome_jax.diffusion.likelihood import elbo  # noqa: E402
from timerome_jax.diffusion.sampler import SamplerConfig, generate, generate_text  # noqa: E402
from timerome_jax.method.facts import Fact, load_facts, make_facts  # noqa: E402
from timerome_jax.method.memory import EditMemory  # noqa: E402
from timerome_jax.method.memory_file import load as load_memory  # noqa: E402
from timerome_jax.method.capture import model_fingerprint  # noqa: E402
from timerome_jax.method.memory_file import save as save_memory  # noqa: E402
from timerome_jax.method.screen import ScreenedTrace, screen, screen_and_trace, select_screened  # noqa: E402
from timerome_jax.method.trace import Coordinate, TraceConfig, TraceResult, select  # noqa: E402
from timerome_jax.pipeline import DemoConfig, demo, install, save_trace, trace_facts  # noqa: E402
from timerome_jax.tofu.data import format_prompt, load_split  # noqa: E402
from timerome_jax.tofu.evaluate import evaluate  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL, DEFAULT_RETAIN_MODEL  # noqa: E402
from timerome_jax.tofu.report import compare, markdown_table, write_report  # noqa: E402

__all__ = [
    # models
    "load_model", "load_model_with_tokenizer", "load_pretrained", "save_pretrained", "DEFAULT_MODEL",
    "DEFAULT_RETAIN_MODEL", "ModelConfig", "MODULES", "forward", "run", "init_params", "MDLM", "unstack", "stack",
    "validate",
    # the method
    "Fact", "load_facts", "make_facts", "TraceConfig", "TraceResult", "trace_facts", "save_trace", "select",
    "Coordinate", "install", "EditMemory", "save_memory", "load_memory", "model_fingerprint", "Intervene",
    "Patch", "screen", "screen_and_trace", "select_screened", "ScreenedTrace",
    # diffusion
    "SamplerConfig", "generate", "generate_text", "elbo",
    # TOFU
    "load_split", "format_prompt", "evaluate", "compare", "markdown_table", "write_report",
    # all of it
    "DemoConfig", "demo", "__version__",
]
