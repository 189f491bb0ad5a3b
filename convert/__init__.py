"""One-off converters (run from the repo root: `python -m convert.to_orbax HF_DIR OUT_DIR`)."""
