"""fptt_fast.FPTT as a drop-in optimiser: torch's nn.LSTM and a linear head on the Add task,
trained segment by segment (FPTT, docs/ALGORITHM.md). Where this script had
torch.optim.Adam, it now has fptt_fast.FPTT.

    python examples/optimizer_swap.py [--steps 300]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import fptt_fast
from fptt_fast.reference import segment_bounds
from fptt_fast.tasks import add_task


class AddModel(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.rnn = nn.LSTM(2, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, state=None):
        out, state = self.rnn(x, state)
        return self.head(out[-1]), state      # predict from the segment's last step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    T, K, B = 20, 4, 128
    model = AddModel(hidden=32)
    opt = fptt_fast.FPTT(model.parameters(), lr=1e-2, optimizer="adam", alpha=0.0, clip=1.0)
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x, y = add_task(T, B, gen)                        # x [T, B, 2], y [B, 1]
        state = None
        for p, (a, b) in enumerate(segment_bounds(T, K)):
            pred, state = model(x[a:b], state)
            state = tuple(s.detach() for s in state)      # carried, but detached
            opt.zero_grad(set_to_none=False)
            ((p + 1) / K * F.mse_loss(pred, y)).backward()
            opt.step()                                    # clip, Adam, (regulariser), one fused call
    x, y = add_task(T, 1000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        mse = F.mse_loss(model(x)[0], y).item()
    print(f"test MSE after {args.steps} batches: {mse:.4f} (always predicting 1.0: 0.167)")


if __name__ == "__main__":
    main()
