"""Masked-diffusion machinery over the backbone: the denoising sampler and the ELBO likelihood."""
