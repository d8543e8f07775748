"""What is written to disk and read back: ``snapshots`` (atomic checkpoint folders), ``statedict``
(safetensors state dicts), ``models`` (``load_model``: any model folder → a denoiser and its sampler's
mask law), ``finetune_export`` (export and load finetuned diffusers models), ``upgrades`` (saved
configs of older versions → today's, in one place), ``warmstart`` (weights of another run as a start),
``safe_pickle`` and ``importer`` (the paper's and EDM's pickles, read without running code)."""

from ambient.store.models import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
