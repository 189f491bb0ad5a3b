"""The TOFU models packaged with timerome-jax (HF LLaDA-layout folders under `timerome_jax/assets/`)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "tofu_target"
DEFAULT_RETAIN_MODEL = ASSETS / "tofu_retain"
PACKAGED_RETAIN_TR = DEFAULT_RETAIN_MODEL / "reference"  # bundled retain-model forget TRs
