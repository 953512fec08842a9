"""fptt_fast.FPTTLSTM on the CPU: an LSTM with a linear head whose segment step (forward,
backward, FPTT update) is one fused call; the Add task, K segments per sequence.

    python examples/fpttlstm_cpu.py [--steps 300]
"""
import argparse

import torch

import fptt_fast
from fptt_fast.tasks import add_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    T, K = 20, 4
    m = fptt_fast.FPTTLSTM(2, 32, 1, loss="mse", lr=1e-2, alpha=0.0, clip=1.0, device="cpu")
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        x, y = add_task(T, 128, gen)
        m.train_sequence(x, y, K)          # K segments of ceil(T/K) steps, weights (p+1)/K
    x, y = add_task(T, 1000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, _ = m(x)                      # head outputs at every step [T, B, 1]
        mse = torch.nn.functional.mse_loss(out[-1], y).item()
    print(f"backend {m.backend}: test MSE after {args.steps} batches: {mse:.4f} "
          f"(always predicting 1.0: 0.167)")


if __name__ == "__main__":
    main()
