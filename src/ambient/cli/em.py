"""`ambient em`: flags → EMConfig → ambient.learners.em.run_em."""

from __future__ import annotations

import click

from ambient.learners.core import LR_SCHEDULES
from ambient.learners.em import LAP0, REDRAWS, EMConfig

_D = EMConfig()

# (field, click type, help). Each becomes --field-name. Values are checked by EMConfig.validate.
EM_OPTIONS = [
    ("data", str, "Observations: an npz with 'images' and 'masks', a folder with images/ and masks/, or any "
                  "ambient train data with --corruption-probability (masks drawn per image as ambient train draws "
                  "them)."),
    ("outdir", str, "Run folder; running the same command again resumes where it stopped."),
    ("data_dir", str, "Folder holding builtin datasets' files."),
    ("max_size", int, "Use only the first N observations."),
    ("corruption_pattern", str, "Mask family for drawn masks (dust, box, fixed_box, keep_patch)."),
    ("corruption_probability", float, "p of drawn masks; 0 with data that has no masks: nothing hidden."),
    ("mask_full_rgb", bool, "Drawn masks: one draw per pixel for all its channels."),
    ("laps", int, "Laps: lap 0 = Gaussian completions + training; each further lap = MMPS E-step + training."),
    ("lap_kimg", float, "M-step training per lap, in thousands of images."),
    ("estep_size", int, "Observations completed per lap (a seeded subset; default all). Larger than the data: "
                        "refused."),
    ("pool", bool, "M-steps train on completions of every observation: lap 0 completes all of them (Gaussian "
                   "draws are cheap), each later lap redraws --estep-size of them and keeps the others; "
                   "--no-pool: each M-step trains on its lap's --estep-size completions only."),
    ("redraw", click.Choice(REDRAWS), "Which observations each lap redraws: 'rotate' takes the next "
                                                  "--estep-size of one seeded permutation (every completion at most "
                                                  "ceil(N / --estep-size) laps old); 'random' a fresh subset per "
                                                  "lap (some never redrawn). Default: rotate; a resumed run keeps "
                                                  "its own (runs from before the option: random)."),
    ("rank", int, "Rank r of the lap-0 Gaussian's covariance (diagonal or isotropic + rank r)."),
    ("gaussian_noise", str, "The Gaussian's noise: diagonal (one ψ per pixel) or isotropic (probabilistic PCA)."),
    ("gaussian_iters", int, "Most closed-form EM maps (E-step passes) of the SQUAREM-accelerated Gaussian fit "
                            "(it stops earlier at --gaussian-tol)."),
    ("gaussian_tol", float, "Stop the Gaussian fit when one EM map raises the mean log-likelihood by less than this, "
                            "in nats per observed value (per image / observed values per image: the same meaning "
                            "at any image size; before 2026-12-04, nats per image). 1e-4 stopped SQUAREM within "
                            "60 maps on Fashion-MNIST and 8x8 Gaussians, 3e-3 to 2e-2 nats per observed value below "
                            "the best fit found, 5-10x under the fit's sampling noise (docs/em.md)."),
    ("gaussian_size", int, "Observations the Gaussian is fitted on (a seeded subset; the fit's time grows linearly "
                           "with them, its error falls: on the 8x8 Gaussian at p = 0.9, 0.080 / 0.066 / "
                           "0.036 from the true covariance with 10000 / 20000 / 100000; docs/fidelity.md)."),
    ("steps", int, "E-step sampler steps (EDM schedule)."),
    ("cg_iters", int, "MMPS conjugate-gradient iterations per denoiser call."),
    ("sigma_y", float, "Observation noise σ_y assumed by MMPS (images in [-1, 1]). Default: 0.1 for masked "
                       "data (with 1e-3, the default before 2026-12-05, a learned network's E-step blew 1-2 % of "
                       "the hidden values up; docs/fidelity.md); for measurements files their own σ_y, at least "
                       "1e-3. A resumed run keeps its own."),
    ("solver", str, "E-step ODE solver: heun or euler."),
    ("estep_batch", int, "Observations per E-step batch (each batch is saved: the unit of resuming)."),
    ("arch", str, "Backbone preset of the M-step network."),
    ("batch", int, "M-step batch size."),
    ("lr", float, "M-step Adam learning rate (the optimizer restarts each lap)."),
    ("lr_warmup_kimg", float, "M-step learning-rate warm-up, in kimg (each lap)."),
    ("lr_schedule", click.Choice(LR_SCHEDULES), "M-step learning rate after the warm-up: constant, or cosine decay "
                                                "to 0 at the end of each lap (measured worse on 25-kimg laps, "
                                                "docs/fidelity.md). Default: constant; a resumed run keeps its "
                                                "own."),
    ("ema", float, "M-step EMA half-life in kimg."),
    ("snapshot_kimg", float, "M-step snapshot interval in kimg (the unit of resuming an M-step)."),
    ("grid_samples", int, "Images in each M-step snapshot's sample grid; 0 disables."),
    ("seed", int, "Seed of drawn masks, subsets, posterior draws and training."),
    ("init", str, "An ambient (mask-input) model trained on these observations: lap 0's completions start from "
                  "its posterior mean instead of the Gaussian's."),
    ("lap0", click.Choice(LAP0), "Lap 0's completions: 'sample', exact Gaussian posterior draws (with "
                                               "--init: its posterior mean plus the Gaussian posterior's residual), "
                                               "or 'mean': the posterior mean (Gaussian's, or --init's). Learnt "
                                               "covariance error on the 8x8 fidelity case, p = 0.8 / 0.9: 0.111 / "
                                               "0.155 (sample) vs 0.120 / 0.306 (mean); docs/fidelity.md."),
    ("device", str, "auto, cpu, cuda or cuda:N."),
]


def em_options(func):
    for field, typ, help_text in reversed(EM_OPTIONS):
        flag = f"--{field.replace('_', '-')}"
        default = getattr(_D, field)
        if typ is bool:
            func = click.option(f"{flag}/--no-{flag[2:]}", field, default=default, help=help_text,
                                show_default=True)(func)
        else:
            func = click.option(flag, field, type=typ, default=default, help=help_text,
                                show_default=default is not None)(func)
    return func


@click.command("em")
@em_options
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--progress/--no-progress", default=True, help="Show progress.")
def em_command(threads, progress, **kwargs):
    """Learn a full-image diffusion model from masked observations by EM (Gaussian lap 0, then MMPS E-steps)."""
    import torch

    from ambient.learners.em import run_em

    if threads:
        torch.set_num_threads(threads)
    outdir = run_em(EMConfig(**kwargs), progress=progress, log=lambda m: click.echo(m, err=True))
    click.echo(f"done: {outdir}")


def register(group: click.Group) -> None:
    group.add_command(em_command)
