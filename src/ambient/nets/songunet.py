"""The paper's network: EDM's DDPM++ U-Net ("SongUNet") with optional gated convolutions.

Written from the published structure (Song et al. 2021, as re-implemented in EDM, Karras et al.
2022, and used with gated convolutions by Ambient Diffusion, Daras et al. 2023) with the same
parameter names, so that the reference checkpoints load by name:

* mapping: positional embedding of c_noise (sin, cos halves), plus ``map_label`` (one-hot class
  labels × √label_dim) and ``map_augment`` (augmentation labels) when present, then
  ``map_layer0`` / ``map_layer1`` with SiLU;
* encoder ``enc.{R}x{R}_conv`` / ``_down`` / ``_block{i}``, decoder ``dec.{R}x{R}_in0`` / ``_in1`` /
  ``_up`` / ``_block{i}`` / ``_aux_norm`` / ``_aux_conv``; residual blocks with GroupNorm, an
  additive embedding, skip scale √½, one-head self-attention at ``attn_resolutions``;
* resampling with the [1, 1] filter (2×2 box down, nearest up) as depthwise (transposed) convolutions;
* gated convolutions (``gated=True``): every convolution with a kernel also has ``gate_weight`` G
  and computes conv(x, W) · sigmoid(sigmoid(conv(x, G))) + b (the reference applies the sigmoid twice).

Only the DDPM++ options are implemented (positional embedding, standard encoder and decoder);
other values raise ValueError.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ambient.configbase import dataclass_from_dict


@dataclass(frozen=True)
class SongUNetConfig:
    """Keyword arguments of :class:`SongUNet` (the reference's names); round-trips through JSON."""

    img_resolution: int = 32
    in_channels: int = 6
    out_channels: int = 3
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    channel_mult_noise: int = 1
    resample_filter: tuple[int, ...] = (1, 1)
    gated: bool = True
    embedding_type: str = "positional"
    encoder_type: str = "standard"
    decoder_type: str = "standard"

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attn_resolutions", "resample_filter"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if (self.embedding_type, self.encoder_type, self.decoder_type) != ("positional", "standard", "standard"):
            raise ValueError("only DDPM++ (embedding_type positional, encoder_type and decoder_type standard) "
                             f"is implemented, got {self.embedding_type}/{self.encoder_type}/{self.decoder_type}")
        multiple = 2 ** (len(self.channel_mult) - 1)
        if self.img_resolution % multiple:
            raise ValueError(f"resolution {self.img_resolution} must be a multiple of {multiple} for "
                             f"{len(self.channel_mult)} resolution levels")
        if not self.channel_mult or min(self.channel_mult) < 1 or self.model_channels < 1:
            raise ValueError("model_channels and channel_mult must be positive")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> SongUNetConfig:
        return dataclass_from_dict(cls, d, "songunet")


def _init_(t: torch.Tensor, fan_in: int, fan_out: int, scale: float) -> torch.Tensor:
    """Xavier-uniform initialisation times ``scale`` (in place)."""
    bound = scale * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return t.uniform_(-bound, bound)


class Conv2d(nn.Module):
    """Convolution with optional gate, 2× up/down resampling and no weight at all (kernel 0)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), gated: bool = False, init_scale: float = 1.0):
        super().__init__()
        self.up, self.down, self.gated, self.cin, self.cout = up, down, gated, cin, cout
        fan_in, fan_out = cin * kernel * kernel, cout * kernel * kernel
        shape = (cout, cin, kernel, kernel)
        self.weight = nn.Parameter(_init_(torch.empty(shape), fan_in, fan_out, init_scale)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(cout)) if kernel and bias else None
        self.gate_weight = (nn.Parameter(_init_(torch.empty(shape), fan_in, fan_out, init_scale))
                            if kernel and gated else None)
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", torch.outer(f, f)[None, None] / f.sum() ** 2 if up or down else None)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        f = self.resample_filter
        if f is None:
            return x
        # depthwise (transposed) convolution, as the reference: on CPU faster than avg_pool2d / nearest
        # interpolation for the [1, 1] filter (2.2 vs 4.6 and 2.1 vs 5.9 ms forward + backward at 4×256×32², 1 thread)
        c, pad = x.shape[1], (f.shape[-1] - 1) // 2
        f = f.to(x.dtype)
        if self.up:
            return F.conv_transpose2d(x, (f * 4).tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)
        return F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._resample(x)
        if self.weight is None:
            return x
        pad = self.weight.shape[-1] // 2
        y = F.conv2d(x, self.weight.to(x.dtype), padding=pad)
        if self.gate_weight is not None:
            y = y * torch.sigmoid(torch.sigmoid(F.conv2d(x, self.gate_weight.to(x.dtype), padding=pad)))
        if self.bias is not None:  # in place (as the reference): y is a fresh tensor that no backward needs
            y = y.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))
        return y


def _linear(cin: int, cout: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(cin, cout, bias=bias)
    _init_(lin.weight, cin, cout, 1.0)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class UNetBlock(nn.Module):
    """DDPM++ residual block: norm → SiLU → conv (resampling) → + embedding → norm → SiLU → dropout → conv,
    skip connection, × √½; then optional one-head self-attention, again × √½."""

    def __init__(self, cin: int, cout: int, emb: int, *, up: bool = False, down: bool = False,
                 attention: bool = False, dropout: float = 0.0, resample_filter=(1, 1), gated: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout, self.attention = cin, cout, dropout, attention
        kw = dict(resample_filter=resample_filter, gated=gated)
        self.norm0 = _norm(cin)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down, **kw)
        self.affine = _linear(emb, cout)
        self.norm1 = _norm(cout)
        self.conv1 = Conv2d(cout, cout, 3, init_scale=1e-5, **kw)
        self.skip = Conv2d(cin, cout, 1, up=up, down=down, **kw) if (cin != cout or up or down) else None
        if attention:
            self.norm2 = _norm(cout)
            self.qkv = Conv2d(cout, cout * 3, 1, init_scale=math.sqrt(0.2), **kw)
            self.proj = Conv2d(cout, cout, 1, init_scale=1e-5, **kw)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        # in-place adds and scales on fresh conv outputs: fewer large allocations, the reference's arithmetic
        h = F.silu(self.norm1(h.add_(self.affine(emb).to(h.dtype)[:, :, None, None])))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = h.add_(self.skip(x) if self.skip is not None else x).mul_(math.sqrt(0.5))
        if self.attention:
            n, c, hh, ww = x.shape
            # channel layout of qkv: (c, 3) interleaved, as in the reference
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, hh * ww).unbind(2)
            # written out with bmm as the reference (on CPU faster than scaled_dot_product_attention at these
            # sizes), softmax in float32; the output (n, c, h·w) is contiguous, so the convolutions that follow
            # stay in NCHW (a channels_last tensor here would make every later conv copy its weights)
            w = torch.bmm(q.transpose(1, 2), k / math.sqrt(c)).float().softmax(dim=2)
            a = torch.bmm(v, w.transpose(1, 2).to(v.dtype)).reshape(n, c, hh, ww)
            x = self.proj(a).add_(x).mul_(math.sqrt(0.5))
        return x


class SongUNet(nn.Module):
    """DDPM++ U-Net; ``forward(x, noise_labels, class_labels=None, augment_labels=None)``."""

    def __init__(self, config: SongUNetConfig):
        super().__init__()
        cfg = self.config = config
        mc = cfg.model_channels
        emb, noise = mc * cfg.channel_mult_emb, mc * cfg.channel_mult_noise
        kw = dict(dropout=cfg.dropout, resample_filter=cfg.resample_filter, gated=cfg.gated)
        self.noise_channels = noise
        self.map_label = _linear(cfg.label_dim, noise) if cfg.label_dim else None
        self.map_augment = _linear(cfg.augment_dim, noise, bias=False) if cfg.augment_dim else None
        self.map_layer0 = _linear(noise, emb)
        self.map_layer1 = _linear(emb, emb)

        self.enc = nn.ModuleDict()
        skips, c = [], cfg.in_channels
        for level, mult in enumerate(cfg.channel_mult):
            r = cfg.img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, mc, 3, gated=cfg.gated)
                c = mc
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, emb, down=True, **kw)
            skips.append(c)
            for i in range(cfg.num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, mc * mult, emb, attention=r in cfg.attn_resolutions, **kw)
                c = mc * mult
                skips.append(c)

        self.dec = nn.ModuleDict()
        self._takes_skip: dict[str, bool] = {}
        for level in reversed(range(len(cfg.channel_mult))):
            r, mult = cfg.img_resolution >> level, cfg.channel_mult[level]
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, emb, attention=True, **kw)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, emb, **kw)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, emb, up=True, **kw)
            for i in range(cfg.num_blocks + 1):
                name = f"{r}x{r}_block{i}"
                attn = i == cfg.num_blocks and r in cfg.attn_resolutions
                self.dec[name] = UNetBlock(c + skips.pop(), mc * mult, emb, attention=attn, **kw)
                self._takes_skip[name] = True
                c = mc * mult
        r = cfg.img_resolution
        self.dec[f"{r}x{r}_aux_norm"] = _norm(c)
        self.dec[f"{r}x{r}_aux_conv"] = Conv2d(c, cfg.out_channels, 3, gated=cfg.gated, init_scale=1e-5)

    def embed_noise(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """Positional embedding [sin, cos] with frequencies (1/10⁴)^(i/(n/2 − 1))."""
        half = self.noise_channels // 2
        freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float32, device=noise_labels.device)
                                  / max(half - 1, 1))
        x = noise_labels.float().reshape(-1).outer(freqs)
        return torch.cat([x.sin(), x.cos()], dim=1)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed_noise(noise_labels).expand(x.shape[0], -1)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"this network is class-conditional (label_dim {self.config.label_dim}): "
                                 "class_labels are required")
            labels = class_labels.to(emb.dtype).reshape(x.shape[0], -1)
            if self.training and self.config.label_dropout:
                keep = torch.rand(x.shape[0], 1, device=x.device) >= self.config.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.config.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        out = None
        for name, block in self.dec.items():
            if name.endswith("_aux_norm"):
                out = F.silu(block(x))
            elif name.endswith("_aux_conv"):
                out = block(out)
            else:
                if self._takes_skip.get(name, False):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out
