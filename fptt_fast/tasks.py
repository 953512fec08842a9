"""The paper's data: the Add task (Hochreiter & Schmidhuber; Kag & Saligrama, ICML 2021)."""
from __future__ import annotations

import torch


def add_task(T: int, batch: int, generator: torch.Generator | None = None, device=None):
    """One batch of the Add task, time-major.

    Returns x [T, B, 2] (channel 0: uniform(0, 1) values, channel 1: markers) and
    y [B, 1], the sum of the two marked values. Exactly one marker falls in the first
    half (t < T // 2) and one in the second. Always predicting 1.0 gives MSE ~ 0.167.
    Drawn on the CPU from `generator` (so a seed gives the same data on any device),
    then moved to `device`.
    """
    if T < 2 or batch < 1:
        raise ValueError(f"add_task needs T >= 2 and batch >= 1, got T={T}, batch={batch}")
    half = T // 2
    values = torch.rand(T, batch, generator=generator)
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, T, (batch,), generator=generator)
    markers = torch.zeros(T, batch)
    cols = torch.arange(batch)
    markers[first, cols] = 1.0
    markers[second, cols] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = (values[first, cols] + values[second, cols]).unsqueeze(1)
    return x.to(device), y.to(device)
