"""A small run of every CUDA kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_run.py [--cuda-only]
"""
import sys

import torch

import fptt_fast
from fptt_fast import backends


def main():
    assert torch.cuda.is_available(), "needs a GPU"
    names = ["cuda"] if "--cuda-only" in sys.argv else ["cuda", "triton"]
    for b in names:
        reason = backends.unavailable_reason(b, "cuda")
        if reason:
            print(f"{b}: unavailable: {reason}")
            continue
        torch.manual_seed(0)
        ps = [torch.randn(s, device="cuda", requires_grad=True) for s in [(513, 7), (1,), (70001,)]]
        opt = fptt_fast.FPTT(ps, backend=b, clip=1.0, nonfinite="skip")
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        kernels = ("persistent", "general") if b == "cuda" else (None,)
        for kern in kernels:  # cuda: both LSTM kernels, a whole sequence of segments too
            kw = {"cuda_kernel": kern} if kern else {}
            m = fptt_fast.FPTTLSTM(3, 37, 2, backend=b, device="cuda", clip=1.0, **kw)
            x, y = torch.randn(5, 4, 3, device="cuda"), torch.randn(4, 2, device="cuda")
            for _ in range(2):
                m.train_segment(x, y)
            if b == "cuda":
                m.train_sequence(torch.randn(6, 4, 3, device="cuda"), y, 3)
                print(f"{b}: LSTM kernel {m.last_kernel}")
        torch.cuda.synchronize()
        print(f"{b}: ran")


if __name__ == "__main__":
    main()
