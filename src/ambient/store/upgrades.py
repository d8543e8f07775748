"""Old run folders read as today's: every rule that fills in what an older version did not record.

Each function takes one section of a saved config, as read from its JSON file, and returns it as
today's code would have written it for the same run (a new dict; the argument is left as it is).
Whoever reads a saved config calls the function of its section first, and nowhere else fills in
old folders' gaps:

* a train snapshot's or run's ``config.json``: ``train`` → :func:`train_section` (resume), ``sampling``
  → :func:`sampling_section` (:func:`ambient.store.models.load_model`, also for finetuned exports), ``data``
  → :func:`data_section` (resume, :func:`ambient.store.models.load_model`);
* an em run's ``em_config.json``: ``em`` → :func:`em_section` (resume).

Fields a saved run never recorded and no rule fills in are not compared on resume
(:func:`ambient.learners.core.check_resume_compatible`).
"""

from __future__ import annotations

import math

from ambient.nets.registry import SamplingSpec


def train_section(train: dict) -> dict:
    """A saved ``train`` section (``TrainConfig.to_dict()``) as today's."""
    if not train:
        return train
    # loss_weighting: recorded since 2026-12-01 (4d2df32, "--loss-weighting"); runs from before trained with edm
    # lr_schedule: recorded since 2026-12-04 (--lr-schedule); runs from before trained at a constant rate
    return {**train, "loss_weighting": train.get("loss_weighting") or "edm",
            "lr_schedule": train.get("lr_schedule") or "constant"}


def data_section(data: dict) -> dict:
    """A saved ``data`` section (the training data's facts) as today's: ``value_range`` and ``dtype`` filled in.

    Sections without them (or no section: imported models, finetuned exports) are uint8 data, (0, 255)."""
    data = dict(data) if isinstance(data, dict) else {}
    # value_range, dtype: recorded since issue 25 (float data); runs from before read uint8 images only
    if "value_range" not in data:
        data["value_range"] = [0.0, 255.0]
    if "dtype" not in data:
        data["dtype"] = "uint8"
    return data


def em_section(em: dict, data: dict) -> dict:
    """A saved ``em`` section (``EMConfig.to_dict()``) as today's; ``data``: the same file's ``data`` section
    (the observations' fingerprint and shape)."""
    em = dict(em)
    shape = data.get("shape") if isinstance(data, dict) else None
    # lap0: recorded since 2026-12-01 (38c025f, "--lap0"); runs from before drew exact Gaussian posterior samples
    if em and "lap0" not in em:
        em["lap0"] = "sample"
    # redraw: since issue 24 (2026-12-04); runs from before redrew a fresh seeded subset per lap
    if em and "redraw" not in em:
        em["redraw"] = "random"
    # lr_schedule: since 2026-12-05 (issue 24); the M-steps of runs from before kept a constant rate
    if em and "lr_schedule" not in em:
        em["lr_schedule"] = "constant"
    # gaussian_tol: since issue 24 (2026-12-04); runs from before ran all --gaussian-iters iterations
    if em and "gaussian_tol" not in em:
        em["gaussian_tol"] = None
    # gaussian_tol: nats per observed value since 2026-12-04 (issue 24 item 1, SQUAREM fit; recorded as
    # gaussian_tol_per "value"); runs from before gave nats per image: the same criterion divided by the observed
    # values per image (the data's observed_share × pixels; all pixels when the share was not recorded)
    if em and "gaussian_tol_per" not in em:
        tol = em.get("gaussian_tol")
        if isinstance(tol, (int, float)) and not isinstance(tol, bool):
            pixels = math.prod(shape) if isinstance(shape, list) and all(isinstance(n, int) for n in shape) else None
            share = data.get("observed_share") if isinstance(data, dict) else None
            if pixels:
                observed = pixels * share if isinstance(share, (int, float)) and 0 < share <= 1 else pixels
                em["gaussian_tol"] = tol / max(observed, 1.0)
        em["gaussian_tol_per"] = "value"
    # rank: recorded as used (at most the pixel count) since issue 22 (2026-12-04); before, as given
    if isinstance(shape, list) and all(isinstance(n, int) for n in shape) and isinstance(em.get("rank"), int):
        em["rank"] = min(em["rank"], math.prod(shape))
    return em


def sampling_section(sampling: dict) -> dict:
    """A saved ``sampling`` section (``SamplingSpec.to_dict()``) as today's.

    Sections from before the mask law was recorded get the law their sampler used, the corruption's
    ``mask_full_rgb`` (per channel unless the flag was given), and ``"mask_law_recorded": False``
    (:func:`mask_law_notice` tells the user).
    """
    # mask_law: recorded since issue 13 (2026-12-01, 92c27ab); the sampler then followed corruption.mask_full_rgb
    if not isinstance(sampling, dict) or sampling.get("mask_law") is not None:
        return sampling
    corruption = sampling.get("corruption")
    full_rgb = bool(corruption.get("mask_full_rgb", False)) if isinstance(corruption, dict) else False
    return {**sampling, "mask_law": "pixel" if full_rgb else "channel", "mask_law_recorded": False}


def mask_law_notice(spec: SamplingSpec, img_channels: int, where: str) -> str | None:
    """A one-line notice for an old colour run with data masks whose mask law was not recorded."""
    if spec.mask_law_recorded or spec.data_survival is None or img_channels == 1:
        return None
    return (f"notice: {where} was saved before mask laws were recorded; its sampler draws masks per "
            f"{spec.mask_law} as it was trained (new runs take the law from the data's masks)")
