"""The cpu backend's grid as pytest-benchmark groups: one FPTT segment step for every
omega x H x B of benchmarks/NOTES.md ("The cpu backend"), and whole T=1000 batches.

Group cpu-w<omega>-H<H>-B<B>: fused_cpu (FPTTLSTM backend="cpu"), fused_reference (the
reference backend), authors (their pattern on nn.LSTM), bptt (nn.LSTM + Adam over the
segment), lstm_only (forward and backward alone). Group cpu-batch-T1000-K<K>: fused_cpu
(train_sequence), authors (per segment) and one BPTT step. The variants are those of
cpu_segment_table.py (the committed table); threads: FPTT_BENCH_THREADS (default 1).
FPTT_BENCH_QUICK=1 (CI's default) runs a corner of the grid and T=100 batches.
"""
import pytest
import torch

from conftest import DEVICE, QUICK, measure
from cpu_segment_table import BATCHES, HIDDENS, OMEGAS, make, make_batch

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the cpu backend's grid (CPU only)")

GRID = ([(1, 32, 32), (20, 32, 32)] if QUICK else
        [(w, h, b) for w in OMEGAS for h in HIDDENS for b in BATCHES])
SEGMENT_VARIANTS = ("fused_cpu", "fused_ref", "authors", "bptt", "lstm_only")
BATCH_T = 100 if QUICK else 1000
BATCH_KS = (10,) if QUICK else (10, 1000)


@pytest.mark.parametrize("variant", SEGMENT_VARIANTS)
@pytest.mark.parametrize("omega,H,B", GRID, ids=[f"w{w}-H{h}-B{b}" for w, h, b in GRID])
def bench_cpu_segment(benchmark, omega, H, B, variant):
    torch.manual_seed(0)
    step = make(variant, H, B, omega)
    slow = omega * B * H >= 20 * 128 * 128
    measure(benchmark, step, 1 if slow else 5, 3 if QUICK else 7,
            group=f"cpu-w{omega}-H{H}-B{B}",
            name={"fused_ref": "fused_reference"}.get(variant, variant), omega=omega, H=H, B=B,
            threads=torch.get_num_threads())


@pytest.mark.parametrize("variant", ("fused_cpu", "authors", "bptt"))
@pytest.mark.parametrize("K", BATCH_KS)
def bench_cpu_batch(benchmark, K, variant):
    torch.manual_seed(0)
    step = make_batch(variant, 128, 128, BATCH_T, K)
    measure(benchmark, step, 1, 2 if QUICK else 3, group=f"cpu-batch-T{BATCH_T}-K{K}",
            name=variant, T=BATCH_T, K=K, threads=torch.get_num_threads())
