"""Data shipped with timerome-jax.

`tofu/` holds the TOFU benchmark (Maini et al., COLM 2024; MIT, see `tofu/LICENSE` and
`tofu/README.md` for provenance and checksums). Read it with `timerome_jax.tofu.data.load_split`, which
finds the files through `importlib.resources`, so it also works from an installed wheel.
"""
