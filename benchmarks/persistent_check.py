"""GPU check of the persistent CUDA LSTM kernel (csrc/cuda/lstm_persistent.cu):
correctness against the reference backend, bitwise determinism, and timings beside the
general CUDA kernel, the authors-style reference in one CUDA graph and cuDNN.

    python benchmarks/persistent_check.py [--out DIR] [--quick]

Correctness: FPTTLSTM(backend="cuda", cuda_kernel="persistent") and the same model on
backend="reference" (autograd + FPTT reference) from the same initial weights and state,
train_sequence over several batches (>= 20 updates), compared element by element relative
to the parameters' scale (max |w|): parameters, W-bar, lambda, optimiser moments, losses
and the final state. Determinism: two persistent runs from the same start, bitwise.
Timings (CUDA events, medians): wall per call (eager), kernel (torch.profiler device time
of the kernel), CUDA-graph replay. Writes DIR/persistent.json and prints a table.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fptt_fast  # noqa: E402
from authors_reference import AuthorsFPTT  # noqa: E402

DEV = "cuda"
TOL = 1e-4  # relative to max |w|: through matmuls and reductions (DEVELOPERS.md)


def model(I, H, O, loss, per_step, opt, backend, kernel="auto", seed=0, clip=1.0):
    torch.manual_seed(seed)
    kw = dict(lr=1e-2 if opt == "sgd" else 1e-3, optimizer=opt, clip=clip, loss=loss,
              per_step=per_step, backend=backend, device=DEV)
    if opt == "sgd":
        kw["momentum"] = 0.9
    if backend == "cuda":
        kw["cuda_kernel"] = kernel
    return fptt_fast.FPTTLSTM(I, H, O, **kw)


def batch(T, B, I, O, loss, per_step, g):
    x = torch.randn(T, B, I, device=DEV, generator=g)
    lead = (T, B) if per_step else (B,)
    if loss == "mse":
        y = torch.randn(*lead, O, device=DEV, generator=g)
    else:
        y = torch.randint(0, O, lead, device=DEV, generator=g)
    return x, y


def state_of(m):
    out = {}
    for i, p in enumerate(m.fptt_parameters()):
        st = m.optimizer.state[p]
        out[f"w{i}"] = p.detach().clone()
        for k in ("w_bar", "lam", "exp_avg", "exp_avg_sq", "momentum_buffer"):
            if k in st and st[k] is not None:
                out[f"{k}{i}"] = st[k].detach().clone()
    return out


def run_seq(m, data, K):
    losses = []
    for x, y in data:
        losses.append(m.train_sequence(x, y, K, state=None))
    torch.cuda.synchronize()
    return torch.cat(losses)


def correctness(cases):
    rows = []
    for (T, K, B, I, H, O, loss, per_step, opt, n_batches) in cases:
        g = torch.Generator(device=DEV).manual_seed(1234)
        data = [batch(T, B, I, O, loss, per_step, g) for _ in range(n_batches)]
        ref = model(I, H, O, loss, per_step, opt, "reference")
        per = model(I, H, O, loss, per_step, opt, "cuda", "persistent")
        per2 = model(I, H, O, loss, per_step, opt, "cuda", "persistent")
        gen = model(I, H, O, loss, per_step, opt, "cuda", "general")
        lr_ = run_seq(ref, data, K)
        lp = run_seq(per, data, K)
        lp2 = run_seq(per2, data, K)
        run_seq(gen, data, K)  # its state is compared below (err_general)
        sr, sp, sp2, sg = state_of(ref), state_of(per), state_of(per2), state_of(gen)
        scale = max(float(v.abs().max()) for k, v in sr.items() if k.startswith("w"))
        err = max(float((sp[k] - sr[k]).abs().max()) for k in sr) / scale
        err_gen = max(float((sg[k] - sr[k]).abs().max()) for k in sr) / scale
        lerr = float((lp - lr_).abs().max() / lr_.abs().max().clamp_min(1e-30))
        bitwise = all(torch.equal(sp[k], sp2[k]) for k in sp) and torch.equal(lp, lp2)
        finite = all(bool(torch.isfinite(v).all()) for v in sp.values())
        ok = err <= TOL and lerr <= TOL and bitwise and finite and per.last_kernel == "persistent"
        rows.append(dict(T=T, K=K, B=B, I=I, H=H, O=O, loss=loss, per_step=per_step, opt=opt,
                         updates=K * n_batches, err=err, err_general=err_gen, loss_err=lerr,
                         bitwise=bitwise, ok=ok))
        print(f"{'PASS' if ok else 'FAIL'} T={T} K={K} B={B} I={I} H={H} O={O} {loss}"
              f"{' per-step' if per_step else ''} {opt}: err {err:.2e} (general {err_gen:.2e}) "
              f"loss err {lerr:.2e} bitwise {bitwise}", flush=True)
    return rows


def events_ms(fn, n):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def median_us(fn, n=10, reps=7):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = sorted(events_ms(fn, n) for _ in range(reps))
    return 1000.0 * ts[len(ts) // 2]


def kernel_us(fn, name_part, n=10):
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    tot = 0.0
    for ev in prof.key_averages():
        if name_part in ev.key:
            tot += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return tot / n


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Net(nn.Module):
    def __init__(self, I, H, O):
        super().__init__()
        self.rnn, self.head = nn.LSTM(I, H), nn.Linear(H, O)

    def forward(self, x, state):
        _, (h, c) = self.rnn(x, state)
        return self.head(h[0])


def timings(quick):
    I, H, O, B = 2, 128, 1, 128
    res = []
    g = torch.Generator(device=DEV).manual_seed(7)

    def add(name, us_wall=None, us_kernel=None, us_graph=None, **kw):
        row = dict(name=name, wall_us=us_wall, kernel_us=us_kernel, graph_us=us_graph, **kw)
        res.append(row)
        f = lambda v: "-" if v is None else f"{v:9.1f}"  # noqa: E731
        print(f"{name:44s} wall {f(us_wall)}  kernel {f(us_kernel)}  graph {f(us_graph)}", flush=True)

    for omega in (1, 100):
        x = torch.randn(omega, B, I, device=DEV, generator=g)
        y = torch.randn(B, O, device=DEV, generator=g)
        st = (0.1 * torch.randn(B, H, device=DEV, generator=g), 0.1 * torch.randn(B, H, device=DEV, generator=g))
        for kern, kname in (("persistent", "lstm_persistent"), ("general", "lstm_segment_kernel")):
            m = model(I, H, O, "mse", False, "adam", "cuda", kern)
            m.optimizer.nonfinite = "skip"
            fn = lambda: m.train_segment(x, y, state=st)  # noqa: E731
            add(f"add w={omega} segment cuda/{kern} (skip)", median_us(fn), kernel_us(fn, kname),
                median_us(graphed(fn)))
            if kern == "persistent":
                m2 = model(I, H, O, "mse", False, "adam", "cuda", kern)
                fn2 = lambda: m2.train_segment(x, y, state=st)  # noqa: E731
                add(f"add w={omega} segment cuda/{kern} (raise)", median_us(fn2))
                os.environ["FPTT_FAST_STATUS"] = "mapped"  # read when FPTT is built
                try:
                    m3 = model(I, H, O, "mse", False, "adam", "cuda", kern)
                finally:
                    del os.environ["FPTT_FAST_STATUS"]
                assert m3.optimizer._status_host is not None
                fn3 = lambda: m3.train_segment(x, y, state=st)  # noqa: E731
                add(f"add w={omega} segment cuda/{kern} (raise, mapped status)", median_us(fn3))
        # the authors-style reference in one CUDA graph, and cuDNN fwd+bwd alone
        net = Net(I, H, O).to(DEV)
        h0 = (st[0][None].clone(), st[1][None].clone())
        authors = AuthorsFPTT(net.parameters(), lr=1e-3, clip=1.0, capturable=True)

        def ref_step():
            authors.opt.zero_grad(set_to_none=False)
            authors.finish(F.mse_loss(net(x, h0), y))
        add(f"add w={omega} reference (authors) eager", median_us(ref_step))
        add(f"add w={omega} reference (authors) graph", None, None, median_us(graphed(ref_step)))

        def cudnn():
            net.zero_grad()
            F.mse_loss(net(x, h0), y).backward()
        add(f"add w={omega} cuDNN fwd+bwd eager", median_us(cudnn))

    # whole batches: T = 1000, K = 10 and K = 1000
    T = 1000
    x = torch.randn(T, B, I, device=DEV, generator=g)
    y = torch.randn(B, O, device=DEV, generator=g)
    for K in (10, 1000):
        for kern, kname in (("persistent", "lstm_persistent"), ("general", "lstm_segment_kernel")):
            if kern == "general" and K == 1000 and quick:
                continue
            m = model(I, H, O, "mse", False, "adam", "cuda", kern)
            m.optimizer.nonfinite = "skip"
            fn = lambda: m.train_sequence(x, y, K, graph=False)  # noqa: E731 (eager launch)
            n = 3 if K == 1000 else 5
            add(f"add T=1000 K={K} sequence cuda/{kern}", median_us(fn, n=n, reps=3),
                kernel_us(fn, kname, n=n))
            if kern == "persistent":  # train_sequence's own graph mode (the default on cuda)
                fg = lambda: m.train_sequence(x, y, K)  # noqa: E731
                add(f"add T=1000 K={K} sequence cuda/{kern} graph=None (replay)",
                    median_us(fg, n=n, reps=3))
    net = Net(I, H, O).to(DEV)

    def bptt():
        net.zero_grad()
        F.mse_loss(net(x, None), y).backward()
    add("add T=1000 cuDNN BPTT fwd+bwd eager", median_us(bptt, n=5, reps=3))
    return res


PHASES = ("forward", "head", "backward", "partials+sync", "reduce+sync", "update+sync")


def phase_profile(label, fn, omega):
    """Block 0's phase times (clock64 stamps written by the kernel), in us per segment."""
    ext = fptt_fast.backends.extension()
    n = ext._lstm_persistent_profile_slots
    stamps = torch.zeros(n, dtype=torch.int64, device=DEV)
    fn()
    torch.cuda.synchronize()
    ext._lstm_persistent_profile(stamps)
    fn()
    torch.cuda.synchronize()
    ext._lstm_persistent_profile(None)
    st = stamps.cpu().tolist()
    gt0, c0, gt1, c1 = st[-4:]
    ghz = (c1 - c0) / max(gt1 - gt0, 1)  # clock ticks per ns
    segs = [st[i * 8:(i + 1) * 8] for i in range(8)]
    segs = [sg for sg in segs if sg[0] and sg[6]]
    out = {}
    for i, name in enumerate(PHASES):
        out[name] = sum((sg[i + 1] - sg[i]) for sg in segs) / len(segs) / ghz / 1000.0
    out["total_us_launch"] = (c1 - c0) / ghz / 1000.0
    out["clock_ghz"] = ghz
    line = "  ".join(f"{k} {v:.1f}" for k, v in out.items() if k in PHASES)
    print(f"profile {label}: per segment (us): {line}; per step fwd "
          f"{out['forward'] / omega:.2f} bwd {out['backward'] / omega:.2f}; clock {ghz:.2f} GHz",
          flush=True)
    return out


def profiles():
    I, H, O, B = 2, 128, 1, 128
    g = torch.Generator(device=DEV).manual_seed(9)
    res = {}
    for omega in (1, 10, 100):
        x = torch.randn(omega, B, I, device=DEV, generator=g)
        y = torch.randn(B, O, device=DEV, generator=g)
        m = model(I, H, O, "mse", False, "adam", "cuda", "persistent")
        res[f"add_w{omega}"] = phase_profile(f"add w={omega}", lambda: m.train_segment(x, y), omega)
    return res


DEBUG_BITS = {"real": 0, "barrier x2": 1, "no global stores": 2, "no DSMEM": 4,
              "no prefetch": 8, "aligned barrier": 16, "product x2": 32, "no cell": 64}


def experiments():
    """Timing experiments (kernel variants that mostly compute wrong results): what each
    part of a time step costs, from the differences."""
    ext = fptt_fast.backends.extension()
    I, H, O, B, omega = 2, 128, 1, 128, 100
    g = torch.Generator(device=DEV).manual_seed(11)
    x = torch.randn(omega, B, I, device=DEV, generator=g)
    y = torch.randn(B, O, device=DEV, generator=g)
    out = {}
    for name, bits in DEBUG_BITS.items():
        m = model(I, H, O, "mse", False, "adam", "cuda", "persistent")
        m.optimizer.nonfinite = "skip"
        ext._lstm_persistent_debug(bits)
        fn = lambda: m.train_segment(x, y)  # noqa: E731
        us = median_us(fn, n=5, reps=5)
        prof = phase_profile(f"exp {name}", fn, omega)
        out[name] = dict(kernel_us=us, **prof)
        print(f"experiment {name:18s} {us:8.1f} us", flush=True)
    ext._lstm_persistent_debug(0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--experiments", action="store_true", help="tuning variants instead of the timings")
    args = ap.parse_args()
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    ext = fptt_fast.backends.extension()
    for H in (1, 16, 64, 128):
        print("plan B=128 H=%d:" % H, ext.lstm_persistent_plan_cuda(128, 2, H, 1, 1, 0))
    print("plan B=300 H=128:", ext.lstm_persistent_plan_cuda(300, 2, 128, 1, 1, 0))
    t0 = time.time()
    rows = []
    if not args.skip_correctness:
        # (T, K, B, I, H, O, loss, per_step, opt, batches)
        cases = [
            (20, 10, 5, 2, 16, 1, "mse", False, "adam", 2),
            (30, 10, 7, 3, 33, 4, "ce", False, "sgd", 2),
            (12, 4, 9, 5, 7, 3, "mse", True, "adamw", 5),
            (20, 20, 64, 2, 128, 1, "mse", False, "adam", 1),
            (40, 10, 128, 2, 128, 1, "mse", False, "sgd", 2),
            (21, 7, 33, 32, 64, 10, "ce", True, "sgd", 3),
            (10, 10, 200, 1, 1, 32, "ce", False, "adam", 2),
            (60, 3, 128, 1, 128, 10, "ce", False, "adam", 7),
        ]
        if args.quick:
            cases = cases[:4]
        rows = correctness(cases)
    print(f"correctness: {time.time() - t0:.1f} s", flush=True)
    # the phase stamps and experiment bits exist only in a tuning build (FPTT_FAST_TUNING=1)
    tuning = hasattr(ext, "_lstm_persistent_profile")
    if not tuning:
        print("phase profile and experiments skipped: fptt_fast._C was built without "
              "FPTT_FAST_TUNING=1", flush=True)
    if args.experiments and not tuning:
        raise SystemExit("--experiments needs a build with FPTT_FAST_TUNING=1")
    prof = profiles() if tuning else {}
    exps = experiments() if args.experiments else {}
    res = [] if args.experiments else timings(args.quick)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "persistent.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                       date=time.strftime("%Y-%m-%d"), correctness=rows, timings=res, profile=prof, experiments=exps), f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(f"persistent_check: {len(rows) - len(bad)}/{len(rows)} correctness cases passed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
