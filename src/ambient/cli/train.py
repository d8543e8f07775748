"""`ambient train`: flags → TrainConfig → ambient.learners.train.train; with k-space measurements as --data,
flags → KSpaceAmbientConfig → ambient.learners.kspace_ambient.train_kspace_ambient."""

from __future__ import annotations

import click

from ambient.data.corruption import PATTERNS
from ambient.learners.train_config import LR_SCHEDULES, OBJECTIVES, PRECISIONS, RESUME_LATEST, TrainConfig
from ambient.nets.registry import ARCHS
from ambient.objectives.losses import NORMALIZATIONS, WEIGHTINGS

_D = TrainConfig()

# (field, click type, help). Each becomes --field-name, with the seed's --field_name accepted too.
TRAIN_OPTIONS = [
    ("data", str, "Dataset: builtin:fashion-mnist, builtin:digits, an image folder, an EDM zip or an .npz; or a "
                  "k-space measurements .npz (ambient measure --operator kspace): k-space ambient training, which "
                  "takes --delta-probability, --arch, --batch, --lr, --kimg, --ema, --seed, --outdir and refuses "
                  "the other flags (its defaults: those of ambient.learners.kspace_ambient.KSpaceAmbientConfig)."),
    ("outdir", str, "Output folder; running again into it resumes from its latest snapshot."),
    ("data_dir", str, "Folder holding builtin datasets' files (else env AMBIENT_DATA, then system paths)."),
    ("max_size", int, "Use only the first N images."),
    ("resolution", int, "Resize images to this square size."),
    ("corruption_probability", float, "p: what the mask A hides (share of pixels for dust)."),
    ("delta_probability", float, "δ: what the further mask Ã hides on top of A (k-space data: the share of "
                                  "acquired non-centre line pairs Ã drops, default 0.2)."),
    ("corruption_pattern", click.Choice(PATTERNS), "Mask family."),
    ("mask_full_rgb", bool, "One mask draw per pixel for all its channels (Ã, the sampler's masks, drawn dust A). "
                            "Default: as the data's masks (per pixel when they agree across channels), else per "
                            "channel."),
    ("fixed_further", bool, "The paper's variant: Ã fixed per image instead of redrawn each step."),
    ("objective", click.Choice(OBJECTIVES), "ambient; naive (plain EDM on A⊙x0 as if clean); noisy (images with "
                                            "Gaussian noise of the known std --noise-sigma: learns the clean "
                                            "denoiser E[x0 | x_σ] for σ above it; no masks)."),
    ("noise_sigma", float, "--objective noisy only (and required): the std σ_n of the noise in the images, in the "
                           "data's units (0..255 for uint8 data, the value_range of float data, as ambient measure "
                           "--sigma-y); recorded with its value in model units ([-1, 1])."),
    ("arch", click.Choice(ARCHS), "Backbone preset: diffusers UNets, or the paper's DDPM++ (ddpmpp-*)."),
    ("arch_kwargs", str, "ddpmpp-* only: JSON of network options over the preset, e.g. "
                         "'{\"model_channels\": 64, \"dropout\": 0.1}' "
                         "(names of ambient.nets.songunet.SongUNetConfig)."),
    ("batch", int, "Global batch size."),
    ("lr", float, "Adam learning rate (after warm-up)."),
    ("lr_warmup_kimg", float, "Linear learning-rate warm-up, in thousands of images."),
    ("lr_schedule", click.Choice(LR_SCHEDULES), "After the warm-up: constant, or cosine decay to 0 at --kimg "
                                                "(raising --kimg on resume stretches it). Default: cosine for a new "
                                                "run; a resumed run keeps its own (constant for runs from before "
                                                "the option); docs/fidelity.md."),
    ("kimg", float, "Training duration in thousands of images (fractions allowed)."),
    ("ema", float, "EMA half-life in kimg."),
    ("ema_rampup", float, "EMA half-life ramp-up ratio (half-life ≤ ratio × images seen); 0 disables."),
    ("max_grad_norm", float, "Gradient clipping norm; 0 disables."),
    ("dropout", float, "Dropout probability in the backbone."),
    ("augment", float, "Probability of an x-flip per image (image, A and Ã flip together)."),
    ("loss_normalize", click.Choice(NORMALIZATIONS), "mean over observed pixels, or the paper's plain sum."),
    ("loss_weighting", click.Choice(WEIGHTINGS), "edm: the paper's w(σ) on every graded pixel; pixel: 1/σ_d² on the "
                                                 "graded pixels Ã hides; tilted: pixel's weights, half the batch's σ "
                                                 "drawn where the sampler reads hidden pixels "
                                                 "(ambient.objectives.losses, docs/fidelity.md). Default: tilted with "
                                                 "--mask-aware, edm without; "
                                                 "a resumed run keeps its own (runs from before the option: edm)."),
    ("mask_aware", bool, "Mask-aware preconditioning (c_skip=0, c_out=σ_data at hidden pixels)."),
    ("cond", bool, "Class-conditional (labels from the data; needs a ddpmpp-* --arch); sample with --class."),
    ("seed", int, "Seed of masks, data order and noise."),
    ("init", str, "Warm start: a model (outdir or snapshot) whose EMA weights start the network and its EMA; "
                  "same architecture only; the optimizer starts afresh. Ignored when resuming."),
    ("snapshot_kimg", float, "Snapshot interval in kimg."),
    ("tick_kimg", float, "Logging interval in kimg (stats.jsonl, TensorBoard)."),
    ("grid_samples", int, "Images in each snapshot's sample grid; 0 disables."),
    ("precision", click.Choice(PRECISIONS), "fp32, or bf16 autocast."),
    ("channels_last", bool, "Use channels_last memory format."),
    ("compile", bool, "torch.compile the model."),
    ("max_nonfinite", int, "Stop after this many consecutive non-finite steps."),
    ("device", str, "auto, cpu, cuda or cuda:N."),
]


def train_options(func):
    for field, typ, help_text in reversed(TRAIN_OPTIONS):
        flag = field.replace("_", "-")
        names = [f"--{flag}"] + ([f"--{field}"] if "_" in field else [])
        default = getattr(_D, field)
        if typ is bool:
            func = click.option(*[f"{n}/--no-{n[2:]}" for n in names[:1]], *(
                [f"{names[1]}/--no_{field}"] if len(names) > 1 else []), field, default=default,
                help=help_text, show_default=True)(func)
        else:
            func = click.option(*names, field, type=typ, default=default, help=help_text,
                                show_default=default is not None)(func)
    return func


@click.command("train")
@train_options
@click.option("--resume", "resume", type=str, default=None, is_flag=False, flag_value=RESUME_LATEST,
              help="Snapshot or outdir to resume from; bare --resume: the latest snapshot in --outdir (an error "
                   "if there is none). Default: the outdir's latest snapshot, if any.")
@click.option("--dry-run", "--dry_run", "dry_run", is_flag=True, help="Print the resolved config; write nothing.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def train_command(dry_run: bool, progress: bool, **kwargs):
    """Train a denoiser on corrupted data (ambient) or as a naive/clean EDM baseline."""
    from ambient.learners import kspace_ambient
    from ambient.learners.train import dry_run as resolve
    from ambient.learners.train import train

    if kspace_ambient.trains_kspace(kwargs["data"], kwargs["objective"]):
        ctx = click.get_current_context()
        given = {name for name in kwargs
                 if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
        kcfg = kspace_ambient.config_from_train_flags(kwargs, given)
        if dry_run:
            click.echo(kspace_ambient.dry_run(kcfg))
            return
        click.echo(f"done: {kspace_ambient.train_kspace_ambient(kcfg, log=lambda m: click.echo(m, err=True))}")
        return
    cfg = TrainConfig(**kwargs)
    if dry_run:
        click.echo(resolve(cfg))
        return
    from ambient.distributed import rank_from_env

    outdir = train(cfg, progress=progress, log=lambda m: click.echo(m, err=True))
    if rank_from_env() == 0:
        click.echo(f"done: {outdir}")


def register(group: click.Group) -> None:
    group.add_command(train_command)
