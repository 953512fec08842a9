"""One Add-task segment (H=128, I=2, B=128, omega=100) on the persistent CUDA LSTM kernel,
for Nsight Compute (what bounds the kernel):

    ncu --clock-control none -k regex:lstm_persistent --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight ... python benchmarks/ncu_run.py [--omega 100]

The first call warms up (plan cache, occupancy query); the second is the one profiled.
"""
import argparse

import torch

import fptt_fast


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--omega", type=int, default=100)
    ap.add_argument("--kernel", default="persistent")
    a = ap.parse_args()
    torch.manual_seed(0)
    m = fptt_fast.FPTTLSTM(2, 128, 1, backend="cuda", device="cuda", cuda_kernel=a.kernel,
                           clip=1.0, nonfinite="skip")
    x = torch.randn(a.omega, 128, 2, device="cuda")
    y = torch.randn(128, 1, device="cuda")
    for _ in range(2):
        m.train_segment(x, y)
    torch.cuda.synchronize()
    print("kernel:", m.last_kernel)


if __name__ == "__main__":
    main()
