"""Unlearning baselines, all on the masked-diffusion objective and behind `timerome_jax.methods`:

losses.py     GA, GD, NPO, SimNPO, Adaptive-RMU, MDU (no autoregressive shift)
train.py      one optax loop (adamw, clip 1.0, retain-NLL anchor, early stop on RetainLP drift)
lora.py       LoRA adapters as their own pytree (save/load atomically)
inference.py  inference-time baselines as `Intervene` edits: random_layer, act_steer, rmu_like
registry.py   registers every method under `methods.register` (import it to make them available)
"""
