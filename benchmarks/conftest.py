"""Shared set-up of the benchmarks (pytest-benchmark).

FPTT_BENCH_QUICK=1 (the default on a machine without a GPU) keeps sizes and rounds
small so that CI can run the suite and it never rots; the GPU harness runs it full.
Each benchmark times `inner` calls followed by one device synchronisation and
records the per-call time in extra_info["us_per_call"] (median over rounds), which
benchmarks/report.py turns into ratio tables.
"""
import os
import statistics
import time

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("FPTT_BENCH_QUICK", "1" if DEVICE == "cpu" else "0") == "1"
# CPU threads: 1 unless FPTT_BENCH_THREADS says otherwise, as the command line does (README,
# "Threads"); the report prints the count.
torch.set_num_threads(int(os.environ.get("FPTT_BENCH_THREADS", "1")))


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure(benchmark, fn, inner, rounds, group, name, **info):
    """Time `fn` with pytest-benchmark; warm up first; report per-call microseconds."""
    for _ in range(3):
        fn()
    sync()

    def block():
        for _ in range(inner):
            fn()
        sync()

    benchmark.group = group
    benchmark.extra_info.update(info, group=group, variant=name, inner=inner, device=DEVICE)
    benchmark.pedantic(block, rounds=rounds, iterations=1, warmup_rounds=1)
    # CUDA events around the same block give a device-side median as well
    if DEVICE == "cuda":
        ts = []
        for _ in range(rounds):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / inner)
        benchmark.extra_info["us_per_call"] = statistics.median(ts)
    else:
        benchmark.extra_info["us_per_call"] = benchmark.stats.stats.median * 1e6 / inner


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="session", autouse=True)
def copy_bandwidth(request):
    """This machine's copy bandwidth (bytes read + written per second), measured once
    in the same run, so GB/s figures can be read against it."""
    n = (1 << 26) if DEVICE == "cuda" and not QUICK else (1 << 23)
    a = torch.randn(n, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        ts.append(time.perf_counter() - t0)
    bw = 2 * 4 * n / statistics.median(ts)
    request.config._fptt_copy_bw = bw
    return bw


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fptt"] = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__, "quick": QUICK,
        "copy_GBps": getattr(config, "_fptt_copy_bw", 0.0) / 1e9,
        "threads": torch.get_num_threads(),
    }
