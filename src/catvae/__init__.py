"""catvae: categorical VAEs with pluggable gradient estimators for discrete latent variables."""

__version__ = "0.1.0"
