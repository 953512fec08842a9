"""fptt_fast.FPTT on a model fptt_fast has no kernel for: a hand-written recurrent cell
(a minimal GRU-like cell, unrolled in Python) on the Add task. FPTT needs only the
segment's gradients in p.grad; the cell can be anything autograd differentiates.

    python examples/custom_cell.py [--steps 300]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import fptt_fast
from fptt_fast.reference import segment_bounds
from fptt_fast.tasks import add_task


class MinimalGatedCell(nn.Module):
    """h' = (1 - z) * h + z * tanh(W x + U (r * h)), with gates z, r from [x, h]."""

    def __init__(self, inputs, hidden):
        super().__init__()
        self.gates = nn.Linear(inputs + hidden, 2 * hidden)
        self.cand_x = nn.Linear(inputs, hidden)
        self.cand_h = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, 1)
        self.hidden = hidden

    def forward(self, x, h=None):
        h = x.new_zeros(x.shape[1], self.hidden) if h is None else h
        for xt in x.unbind(0):
            z, r = torch.sigmoid(self.gates(torch.cat([xt, h], 1))).chunk(2, 1)
            h = (1 - z) * h + z * torch.tanh(self.cand_x(xt) + self.cand_h(r * h))
        return self.head(h), h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    T, K = 20, 4
    model = MinimalGatedCell(2, 32)
    opt = fptt_fast.FPTT(model.parameters(), lr=1e-2, alpha=0.0, clip=1.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        x, y = add_task(T, 128, gen)
        h = None
        for p, (a, b) in enumerate(segment_bounds(T, K)):
            pred, h = model(x[a:b], h)
            h = h.detach()
            opt.zero_grad(set_to_none=False)
            ((p + 1) / K * F.mse_loss(pred, y)).backward()
            opt.step()
    x, y = add_task(T, 1000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        mse = F.mse_loss(model(x)[0], y).item()
    print(f"test MSE after {args.steps} batches: {mse:.4f} (always predicting 1.0: 0.167)")


if __name__ == "__main__":
    main()
