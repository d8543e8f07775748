import torch
from torch import nn


class MLPBackbone(nn.Module):
    """A small fully connected backbone for low-dimensional tests: (net_input, c_noise) -> image."""

    def __init__(self, shape, in_channels, hidden=256):
        super().__init__()
        c, h, w = shape
        self.shape = (c, h, w)
        self.net = nn.Sequential(
            nn.Linear(in_channels * h * w + 16, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, c * h * w),
        )
        self.register_buffer("freqs", torch.linspace(0.5, 8.0, 8))

    def forward(self, x, c_noise):
        n = x.shape[0]
        arg = c_noise.reshape(n, 1) * self.freqs
        emb = torch.cat([arg.sin(), arg.cos()], dim=1)
        return self.net(torch.cat([x.flatten(1), emb], dim=1)).reshape(n, *self.shape)


def torch_threads_guard():
    return torch.get_num_threads()
