"""timerome-jax: TimeROME-DLM (TIE causal tracing + closed-form edit memory) for masked diffusion LMs."""
__version__ = "0.1.0"
