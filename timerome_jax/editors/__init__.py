"""Weight editors (ROME, MEMIT, AlphaEdit) and a GRACE-style codebook for masked diffusion LMs.

Importing this package registers the methods "rome", "memit", "alphaedit" and "grace" with
`timerome_jax.methods`.
"""
from timerome_jax.editors import alphaedit, grace, memit, rome  # noqa: F401  (registration)

__all__ = ["alphaedit", "grace", "memit", "rome"]
