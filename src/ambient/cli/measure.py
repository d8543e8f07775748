"""`ambient measure`: clean images → a measurements file (y = A x + σ_y n with its operator), to simulate data."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ambient.errors import AmbientInputError

OPERATOR_FLAGS = {  # flag → the operator it belongs to
    "probability": "mask", "mask_full_rgb": "mask", "blur_sigma": "blur", "kernel": "blur",
    "acceleration": "kspace", "center_fraction": "kspace",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_out(out: str, data: str) -> Path:
    """Refuse an --out that is not a .npz file path, is a folder, or is the --data file itself."""
    path = Path(out)
    if path.suffix != ".npz":
        raise AmbientInputError(f"--out {out}: must be a .npz file")
    if path.is_dir():
        raise AmbientInputError(f"--out {out}: is a folder")
    if path.exists() and Path(data).exists() and path.resolve() == Path(data).resolve():
        raise AmbientInputError(f"--out {out}: is the --data file itself; measuring would overwrite the images; "
                                "choose another --out")
    return path


def check_operator_flags(operator: str, given: dict) -> None:
    """Each operator's own flags are required (one of --blur-sigma / --kernel for blur); another's are refused."""
    for name, value in given.items():
        if value is not None and OPERATOR_FLAGS[name] != operator:
            raise AmbientInputError(f"{_flag(name)}: only for --operator {OPERATOR_FLAGS[name]} "
                                    f"(got --operator {operator})")
    if operator == "mask" and given["probability"] is None:
        raise AmbientInputError("--operator mask needs --probability p (the share of pixels hidden, e.g. 0.5)")
    if operator == "kspace" and given["acceleration"] is None:
        raise AmbientInputError("--operator kspace needs --acceleration R (1 / the share of k-space lines kept, "
                                "e.g. 4)")
    if operator == "blur" and (given["blur_sigma"] is None) == (given["kernel"] is None):
        raise AmbientInputError("--operator blur needs exactly one of --blur-sigma PX (a Gaussian PSF) or "
                                "--kernel FILE.npy (your PSF)")


def read_kernel(path: str):
    """A 2-D PSF from an .npy file as float64 (odd sizes, finite, not all zero), used as given; and a notice when
    it does not sum to 1."""
    import numpy as np
    import torch

    try:
        k = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AmbientInputError(f"--kernel {path}: cannot read as .npy ({' '.join(str(exc).split())})") from None
    if not isinstance(k, np.ndarray) or k.ndim != 2 or k.dtype.kind not in "fiu":
        raise AmbientInputError(f"--kernel {path}: must be a 2-D array of numbers (kh, kw), got "
                                f"{getattr(k, 'dtype', type(k).__name__)} of shape {getattr(k, 'shape', '?')}")
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise AmbientInputError(f"--kernel {path}: sizes must be odd (a centre pixel), got {k.shape}")
    k = k.astype(np.float64)
    if not np.isfinite(k).all():
        raise AmbientInputError(f"--kernel {path}: has NaN or infinite values")
    if not k.any():
        raise AmbientInputError(f"--kernel {path}: is all zero")
    total = float(k.sum())
    notice = None if abs(total - 1) <= 1e-3 else (
        f"notice: --kernel {path} sums to {total:.4g}; it is used as given (not normalised), so the blur scales "
        "the images' brightness by that much")
    return torch.from_numpy(k), notice


@click.command("measure")
@click.option("--data", required=True,
              help="Clean images: builtin:fashion-mnist, builtin:digits, an image folder, an EDM zip or an .npz "
                   "(uint8, or float with value_range); without masks.")
@click.option("--operator", "operator", required=True, type=click.Choice(["mask", "blur", "kspace"]),
              help="mask: missing pixels (dust); blur: a known PSF; kspace: Cartesian MRI undersampling "
                   "(single-channel images).")
@click.option("--out", required=True, help="Output .npz: y, operator, op_* arrays and value_range "
                                           "(ambient.operators.measurements).")
@click.option("--sigma-y", type=float, default=0.0, show_default=True,
              help="Noise std of each measured value, in the images' own units (0..255 for uint8 data, the "
                   "value_range of float data); k-space: of the real and of the imaginary part each.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of masks and noise (per image index).")
@click.option("--max-size", type=click.IntRange(min=1), default=None, help="Measure only the first N images.")
@click.option("--data-dir", default=None, help="Folder holding builtin datasets' files.")
@click.option("--probability", type=float, default=None,
              help="mask: p, the share of pixels hidden; masks drawn per image as ambient train "
                   "--corruption-probability p --seed N draws them. 0 with --sigma-y S: noise only, the images "
                   "plus noise of std S (for ambient em, and ambient train --objective noisy --noise-sigma S).")
@click.option("--mask-full-rgb", is_flag=True, default=None,
              help="mask: one draw per pixel for all its channels (default: per channel, as ambient train).")
@click.option("--blur-sigma", type=float, default=None, help="blur: a Gaussian PSF of this std in pixels "
                                                             "(size 2⌈3σ⌉+1, sums to 1).")
@click.option("--kernel", default=None, help="blur: your PSF, a 2-D .npy of odd sizes, used as given (not "
                                             "normalised: a PSF that does not sum to 1 scales the brightness).")
@click.option("--acceleration", type=float, default=None,
              help="kspace: R; each image gets its own random mask of round(W / R) phase-encode columns.")
@click.option("--center-fraction", type=float, default=None,
              help="kspace: share of the columns fully sampled around the zero frequency [default: 0.08].")
def measure_command(data, operator, out, sigma_y, seed, max_size, data_dir, probability, mask_full_rgb, blur_sigma,
                    kernel, acceleration, center_fraction):
    """Simulate measurements y = A x + σ_y n of clean images (for ambient em and ambient restore)."""
    from ambient.data.corruption import check_probability
    from ambient.data.datasets import check_masks, load_dataset
    from ambient.operators.blur import gaussian_kernel
    from ambient.operators.kspace import cartesian_mask
    from ambient.operators.measurements import is_measurements_file, save_measurements
    from ambient.operators.simulate import MeasureSpec, simulate

    path = check_out(out, data)
    check_operator_flags(operator, {"probability": probability, "mask_full_rgb": mask_full_rgb,
                                    "blur_sigma": blur_sigma, "kernel": kernel, "acceleration": acceleration,
                                    "center_fraction": center_fraction})
    if not (math.isfinite(sigma_y) and sigma_y >= 0):
        raise AmbientInputError(f"--sigma-y must be a finite number >= 0, got {sigma_y}")
    notices = []
    psf = None
    if operator == "mask":
        try:
            check_probability(probability, "--probability")
        except ValueError as exc:
            raise AmbientInputError(str(exc)) from None
    elif operator == "blur" and kernel is not None:
        psf, notice = read_kernel(kernel)
        notices += [notice] if notice else []
    elif operator == "blur":
        if not (math.isfinite(blur_sigma) and blur_sigma > 0):
            raise AmbientInputError(f"--blur-sigma must be a finite number > 0 (pixels), got {blur_sigma}")
    else:
        if not (math.isfinite(acceleration) and acceleration >= 1):
            raise AmbientInputError(f"--acceleration must be a finite number >= 1, got {acceleration}")
        center_fraction = 0.08 if center_fraction is None else center_fraction
        if not 0 <= center_fraction <= 1:
            raise AmbientInputError(f"--center-fraction must be in [0, 1], got {center_fraction}")
    if is_measurements_file(data):
        raise AmbientInputError(f"--data {data}: is a measurements file (y and operator), not images; "
                                "ambient measure needs clean images")
    images = load_dataset(data, data_dir=data_dir, max_size=max_size)
    if images.has_data_masks:
        raise AmbientInputError(f"--data {data}: comes with masks (incomplete images); ambient measure needs clean "
                                "images (drop the masks, or use the data as it is with ambient em / restore)")
    notices += (check_masks(images, data) or "").splitlines()
    c, h, w = images.shape
    if operator == "blur" and kernel is None:
        if math.ceil(3 * blur_sigma) > max(h, w):
            raise AmbientInputError(f"--blur-sigma {blur_sigma:g}: the PSF (2⌈3σ⌉+1 pixels wide) is over twice as "
                                    f"wide as the {h}x{w} images; at most {max(h, w) / 3:g} px")
        psf = gaussian_kernel(float(blur_sigma))
    if operator == "kspace":
        if c != 1:
            raise AmbientInputError(f"--data {data}: has {c} channels (RGB); --operator kspace needs single-channel "
                                    "(grayscale) images")
        try:
            cartesian_mask(0, h, w, float(acceleration), float(center_fraction))  # checks the settings only
        except ValueError as exc:
            raise AmbientInputError(f"--acceleration {acceleration:g} --center-fraction {center_fraction:g} for "
                                    f"{w} columns: {exc}") from None
    for notice in notices:
        click.echo(notice, err=True)
    spec = MeasureSpec(operator, sigma_y=sigma_y, seed=seed, probability=probability,
                       mask_full_rgb=bool(mask_full_rgb), kernel=psf, acceleration=acceleration,
                       center_fraction=0.08 if center_fraction is None else center_fraction)
    y, op = simulate(images, spec)
    save_measurements(path, y, op, images.value_range)
    lo, hi = images.value_range
    details = {"mask": lambda: f"p {probability:g}",
               "blur": lambda: f"PSF {psf.shape[0]}×{psf.shape[1]}" + (
                   f" Gaussian σ {blur_sigma:g} px" if kernel is None else f" from {kernel}"),
               "kspace": lambda: f"R {acceleration:g}, centre {spec.center_fraction:g}"}[operator]()
    complex_y = " complex" if operator == "kspace" else ""
    y_shape = "×".join(map(str, op.measurement_shape[:-1] if complex_y else op.measurement_shape))
    click.echo(f"wrote {len(images)} observations to {path}: {operator} ({details}), images {c}×{h}×{w}, "
               f"y {y_shape}{complex_y}, σ_y {sigma_y:g} in the data's units (value_range {lo:g}..{hi:g})")


def register(group: click.Group) -> None:
    group.add_command(measure_command)
