"""Ambient Diffusion: train diffusion models on corrupted data only."""

__version__ = "0.1.0"
