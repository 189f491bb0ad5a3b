"""timerome-jax: TimeROME-DLM (TIE causal tracing + closed-form edit memory) for masked diffusion LMs."""
import os as _os

# we use transformers only for tokenizers and configs: its "PyTorch was not found" advice is noise
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
