"""LightningModules (models) and their networks."""

from catvae.models.vae import CategoricalVAE

__all__ = ["CategoricalVAE"]
