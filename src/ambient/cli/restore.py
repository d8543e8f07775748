"""`ambient restore`: clean images consistent with corrupted observations (posterior sampling)."""

from __future__ import annotations

import click

from ambient.sampling.restore import GAUSSIAN_METHODS, METHODS, SOLVERS, RestoreConfig

_D = RestoreConfig()


@click.command("restore")
@click.option("--model", required=True,
              help="Training outdir (its latest snapshot), a snapshot, or a finetuned model; or a k-space ambient run "
                   "(ambient train on k-space measurements) with k-space --data: its one-step posterior mean plus "
                   "data consistency (one restoration per observation; --sigma, --batch, --max-size only).")
@click.option("--data", required=True,
              help="Observations with masks: an npz with 'images' and 'masks', or a folder with images/ and masks/; "
                   "or measurements through any operator (blur, k-space, …): an npz with 'y', 'operator' and "
                   "'value_range' (ambient.operators.measurements).")
@click.option("--out", required=True, help="Output .npz: 'images' (N·M, H, W, C) uint8 and 'index' (the "
                                           "observation each image restores); a grid PNG is written beside it.")
@click.option("--method", type=click.Choice(METHODS), default=_D.method, show_default=True,
              help="mmps (moment matching, Tweedie covariance by VJPs + conjugate gradient), dps (diffusion "
                   "posterior sampling), project (replace the observed pixels of each estimate by y): posterior "
                   "samples, for models with a full-image denoiser (clean- or naive-trained). ambient-mean: "
                   "for ambient (mask-input) models, D(A⊙y, A) with the observation's own mask, which is the "
                   "posterior MEAN, not a sample (one network call; every draw of an observation is the same). "
                   "gaussian-mean / gaussian-sample: no network: the Gaussian prior an ambient em run fitted at lap 0 "
                   "(--model: the em run folder), its exact posterior mean or exact posterior draws.")
@click.option("--steps", type=click.IntRange(min=1), default=_D.steps, show_default=True, help="Sampler steps.")
@click.option("--cg-iters", type=click.IntRange(min=1), default=_D.cg_iters, show_default=True,
              help="MMPS: conjugate-gradient iterations (cost per call: 1 forward + cg-iters + 1 VJPs).")
@click.option("--num-per-image", type=click.IntRange(min=1), default=_D.num_per_image, show_default=True,
              help="Restorations per observation (M).")
@click.option("--sigma-y", type=click.FloatRange(min=0), default=_D.sigma_y, show_default=True,
              help="Observation noise σ_y (images in [-1, 1]).")
@click.option("--seed", type=int, default=_D.seed, show_default=True,
              help="First seed; output row j = i·M + k (draw k of observation i) uses seed+j.")
@click.option("--batch", type=click.IntRange(min=1), default=_D.batch, show_default=True)
@click.option("--dps-step", type=click.FloatRange(min=0, min_open=True), default=_D.dps_step, show_default=True,
              help="DPS step size ζ (the correction is ζ σ² Jᵀ Aᵀ r / rms(r)).")
@click.option("--solver", type=click.Choice(SOLVERS), default=_D.solver, show_default=True)
@click.option("--max-size", type=click.IntRange(min=1), default=None, help="Restore only the first N observations.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights.")
@click.option("--device", default="auto", show_default=True)
@click.option("--sigma", type=float, default=None,
              help="k-space ambient models only: the noise level (model units) the network is told for its one-step "
                   "estimate from the noiseless measurements. Default: its σ_min (0.002), the honest posterior mean; "
                   "at 6 kimg a larger one (0.5 at R = 4, 1 at R = 8) restored better (docs/operators_quick.md): pick "
                   "it on validation data.")
def restore_command(model, data, out, method, steps, cg_iters, num_per_image, sigma_y, seed, batch, dps_step,
                    solver, max_size, ema, device, sigma):
    """Draw clean images consistent with corrupted observations (posterior sampling)."""
    from ambient.data.datasets import load_dataset
    from ambient.distributed import resolve_device
    from ambient.operators.measurements import is_measurements_file, load_measurements
    from ambient.sampling.restore import (
        FAR_ABS,
        check_inputs,
        check_restore_out,
        hint_for,
        restore_distributed,
        write_restored,
    )
    from ambient.store.models import load_model

    out = check_restore_out(out, data)
    from ambient.learners import kspace_ambient

    if kspace_ambient.is_kspace_run(model):
        from ambient.cli.sample import refuse_given

        refuse_given(click.get_current_context(), ("method", "steps", "cg_iters", "num_per_image", "sigma_y", "seed",
                                                   "dps_step", "solver", "ema"), model, "restore", device)
        _restore_kspace(model, data, out, sigma, batch, max_size)
        return
    if sigma is not None:
        raise click.BadParameter(f"only for a k-space ambient --model; {model} is not one", param_hint="--sigma")
    cfg = RestoreConfig(method=method, steps=steps, cg_iters=cg_iters, num_per_image=num_per_image,
                        sigma_y=sigma_y, seed=seed, batch=batch, dps_step=dps_step, solver=solver)
    measured = is_measurements_file(data)
    gaussian = method in GAUSSIAN_METHODS
    if gaussian:  # the em run's lap-0 Gaussian: read before the data, so a wrong --model fails first
        from ambient.learners.gaussian_restore import check_gaussian_inputs, em_gaussian, restore_gaussian

        prior, meta = em_gaussian(model)
    observations = load_measurements(data, max_size=max_size) if measured else load_dataset(data, max_size=max_size)
    if gaussian:
        check_gaussian_inputs(prior, meta, observations, cfg, data_name=str(data), model_name=str(model))
        result = restore_gaussian(prior, observations, cfg)
    else:
        dev = resolve_device(device)
        loaded = load_model(model, use_ema=ema, device=dev)
        check_inputs(loaded, observations, cfg, data_name=str(data), model_name=str(model))
        result = restore_distributed(loaded, observations, cfg, device=device, progress=True)
    if result is not None:
        first = list(range(min(8, len(observations))))
        shown = observations.zero_filled(first) if measured else observations.batch(first)[0]
        path = write_restored(out, result, shown, num_per_image,
                              value_range=observations.value_range if measured or not observations.is_uint8 else None)
        click.echo(f"wrote {len(result.images)} restorations of {len(observations)} observations to {path} "
                   f"({result.seconds:.1f} s)")
        if result.consistency is not None:
            c = result.consistency
            click.echo(f"data consistency ‖A x − y‖ / ‖y‖: mean {float(c.mean()):.4g}, max {float(c.max()):.4g}")
        if result.far:
            op_sy = float(observations.operator.sigma_y) if measured else None
            click.echo(f"notice: {result.far} of {len(result.images)} restorations have values beyond ±{FAR_ABS:g} "
                       "(images in [-1, 1]; clipped in 'images'): the posterior steps were unstable; try "
                       f"{hint_for(cfg, op_sy)}", err=True)


def _restore_kspace(model: str, data: str, out, sigma, batch: int, max_size) -> None:
    from ambient.errors import AmbientInputError
    from ambient.learners.kspace_ambient import load_kspace_ambient, restore_measurements
    from ambient.operators.measurements import is_measurements_file, load_measurements
    from ambient.sampling.restore import write_restored

    if not is_measurements_file(data):
        raise AmbientInputError(f"--data {data}: a k-space ambient model restores k-space measurements (an .npz "
                                "from ambient measure --operator kspace), not images with masks")
    m = load_kspace_ambient(model)
    meas = load_measurements(data, max_size=max_size)
    result = restore_measurements(m, meas, sigma=sigma, batch=batch, data_name=str(data), model_name=str(model))
    first = list(range(min(8, len(meas))))
    path = write_restored(out, result, meas.zero_filled(first), 1, value_range=meas.value_range)
    told = f"σ = {sigma:g}" if sigma is not None else f"σ_min = {m.denoiser.sigma_min:g}"
    click.echo(f"wrote {len(result.images)} restorations of {len(meas)} observations to {path} ({result.seconds:.1f} "
               f"s; one-step posterior mean at {told} + data consistency)")
    if result.consistency is not None:
        c = result.consistency
        click.echo(f"data consistency ‖A x − y‖ / ‖y‖: mean {float(c.mean()):.4g}, max {float(c.max()):.4g}")


def register(group: click.Group) -> None:
    group.add_command(restore_command)
