"""Host overhead on its own: a tiny model on the CPU, where the Python and
binding work around the kernels is all there is to time.

The model: FPTTLSTM's six parameters at I=2, H=2, O=1 (8x2, 8x2, 8, 8, 1x2, 1: six tensors
of <= 16 elements). Gradients are set once and kept (as zero_grad(set_to_none=False) keeps
them), so every step times the step alone. Variants, all in one run (group "host-tiny"):

  torch_adam_foreach  torch.optim.Adam(foreach=True).step()  (less work: no FPTT)
  fptt_cpu            FPTT(backend="cpu").step(): the C++ plan (one call)
  fptt_cpu_lists      the same optimiser forced onto the list path (lists gathered in
                      Python into _C.fused_update_cpu, status recorded in Python): the
                      previous hot path, for comparison
  reference           FPTT(backend="reference").step()
  segment_cpu         FPTTLSTM(backend="cpu").train_segment on x [1, 1, 2] (omega=1, B=1),
                      default input checks (NaN/inf scans on the CPU); from the second
                      call on the fast path, one C++ call (_C.CpuLstmPlan.train)
  segment_cpu_nocheck the same with check_inputs=False

The issue's targets are ratios within one run: fptt_cpu <= 0.1 x torch_adam_foreach, and
segment_cpu <= 3 x fptt_cpu. `ratios(json)` below (python benchmarks/bench_host.py
BENCH.json) prints them from a pytest-benchmark JSON.
"""
import json
import sys

import pytest
import torch

import fptt_fast

from conftest import DEVICE, QUICK, measure

SHAPES = [(8, 2), (8, 2), (8,), (8,), (1, 2), (1,)]  # FPTTLSTM(2, 2, 1)'s parameters
VARIANTS = ["torch_adam_foreach", "fptt_cpu", "fptt_cpu_lists", "reference", "segment_cpu",
            "segment_cpu_nocheck"]


def make(variant):
    torch.manual_seed(0)
    if variant.startswith("segment"):
        m = fptt_fast.FPTTLSTM(2, 2, 1, backend="cpu", lr=1e-3,
                               check_inputs=variant == "segment_cpu")
        x, y = torch.randn(1, 1, 2), torch.randn(1, 1)
        return lambda: m.train_segment(x, y)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    if variant == "torch_adam_foreach":
        return torch.optim.Adam(params, lr=1e-3, foreach=True).step
    opt = fptt_fast.FPTT(params, lr=1e-3, backend="reference" if variant == "reference" else "cpu")
    if variant == "fptt_cpu_lists":
        opt._plan_step = lambda: None  # the list path on every step
    return opt.step


@pytest.mark.skipif(DEVICE != "cpu", reason="host overhead on the CPU backend (a CPU-only run)")
@pytest.mark.parametrize("variant", VARIANTS)
def bench_host(benchmark, variant):
    step = make(variant)
    inner = 50 if variant == "reference" else 200
    measure(benchmark, step, inner, rounds=15 if QUICK else 50, group="host-tiny", name=variant,
            params=sum(torch.Size(s).numel() for s in SHAPES))


def ratios(raw):
    us = {b["extra_info"]["variant"]: b["extra_info"]["us_per_call"] for b in raw["benchmarks"]
          if b["extra_info"].get("group") == "host-tiny"}
    out = {name: round(t, 2) for name, t in sorted(us.items(), key=lambda kv: kv[1])}
    if "fptt_cpu" in us:
        for other in ("torch_adam_foreach", "fptt_cpu_lists", "reference"):
            if other in us:
                out[f"fptt_cpu / {other}"] = round(us["fptt_cpu"] / us[other], 4)
        for seg in ("segment_cpu", "segment_cpu_nocheck"):
            if seg in us:
                out[f"{seg} / fptt_cpu"] = round(us[seg] / us["fptt_cpu"], 2)
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(json.dumps(ratios(json.load(f)), indent=1))
