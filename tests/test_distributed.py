"""Data-parallel FPTT on torch.distributed, on the CPU with gloo.

One spawn of 2 processes (file:// rendezvous in tmp_path, gloo, one thread each) runs every
multi-process scenario; each rank holds its rows of every batch and writes what it ended
with. This process then computes the same training on ONE process holding all rows and
compares:
  - fptt_fast.FPTT (cpu and reference backends) under DistributedDataParallel;
  - FPTTLSTM(process_group=pg) on every backend: cpu and reference (4 + 4 and 4 + 3 rows),
    triton (4 + 3 rows; CPU tensors through Triton's interpreter without a GPU, CUDA
    tensors compiled with one) and cuda (4 + 3 rows, both ranks on the one GPU; skipped,
    saying so, without a GPU). The one-process run of triton and cuda is their one-launch
    step (no process group);
  - a checkpoint written by rank 0 and loaded by both ranks, and by one process;
  - ranks that disagree on sizes or hyper-parameters.
Parameters, W-bar, lambda and the Adam state must be within TOL_UPDATE (2e-5 of max |w|,
the project's fp32 tolerance over 20+ updates; tests/utils.py) of the one-process run
after 24 updates (triton and cuda: TOL_MATMUL, 1e-4, their gradients being reductions in
another order than the one-process launch's), and bitwise identical across the two ranks.
Each comparison is also checked to be able to fail: the run on one rank's rows alone (no
all-reduce) must be far outside the tolerance.
"""
import csv
import datetime
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fptt_fast
from fptt_fast import distributed, reference
from fptt_fast.backends import cuda as cuda_backend
from fptt_fast.backends import segment_unavailable_reason
from fptt_fast.lstm import PARAM_NAMES

from .seam_checks import check_ext
from .utils import device_of

TOL_UPDATE = 2e-5   # tests/utils.py: fp32 element-wise update over 20+ steps
TOL_MATMUL = 1e-4   # tests/utils.py: through matmuls and reductions
TOL_LOSS = 1e-5     # relative: the global mean loss against the one-process loss
WORLD = 2
I, H, O = 3, 8, 2
T, K = 12, 3          # 3 segments of 4 steps per batch
N_BATCHES = 8         # 24 FPTT updates
N_RESUME = 2          # batches trained after loading the checkpoint
LR = 1e-2
HYPER = dict(lr=LR, alpha=0.5, beta=0.5, clip=1.0)
SPAWN_DEADLINE_S = 240

# FPTTLSTM cases: (name, backend, loss, per_step, global batch rows)
LSTM_CASES = [("cpu-mse-terminal-B8", "cpu", "mse", False, 8),
              ("reference-ce-perstep-B7", "reference", "ce", True, 7),
              ("triton-mse-perstep-B7", "triton", "mse", True, 7),
              ("cuda-ce-terminal-B7", "cuda", "ce", False, 7)]
LSTM_TOL = {"cpu": TOL_UPDATE, "reference": TOL_UPDATE, "triton": TOL_MATMUL, "cuda": TOL_MATMUL}
DDP_BACKENDS = ("cpu", "reference")
DDP_B = 8


# -- data and the training loops shared by the ranks and the one-process runs ----------------

def batches(B, loss="mse", per_step=False, n=N_BATCHES + N_RESUME, seed=1234):
    """The global batches: the same on every rank (each takes its rows)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(T, B, I, generator=g)
        lead = (T, B) if per_step else (B,)
        y = (torch.randn(*lead, O, generator=g) if loss == "mse"
             else torch.randint(0, O, lead, generator=g))
        out.append((x, y))
    return out


def shard(data, rank, world, per_step=False):
    out = []
    for x, y in data:
        lo, hi = distributed.shard_rows(x.shape[1], rank, world)
        out.append((x[:, lo:hi].contiguous(),
                    (y[:, lo:hi] if per_step else y[lo:hi]).contiguous()))
    return out


def ddp_train(net, opt, data):
    """FPTT with an nn.Module (plain or DistributedDataParallel): the README's loop."""
    for x, y in data:
        state = None
        for p, (a, b) in enumerate(reference.segment_bounds(T, K)):
            out, state = net(x[a:b], state)
            state = tuple(s.detach() for s in state)
            opt.zero_grad(set_to_none=False)
            ((p + 1) / K * F.mse_loss(out[-1], y)).backward()
            opt.step()


def ddp_model(backend, seed=0, pg=None):
    """(the module to call, its LSTMWithHead, FPTT). With pg the model is wrapped in
    DistributedDataParallel, which broadcasts rank 0's parameters, BEFORE FPTT is built:
    FPTT starts W-bar from the parameters it is given (built first, each rank would keep
    its own W-bar)."""
    torch.manual_seed(seed)
    model = reference.LSTMWithHead(I, H, O)
    net = model if pg is None else torch.nn.parallel.DistributedDataParallel(model, process_group=pg)
    return net, model, fptt_fast.FPTT(model.parameters(), backend=backend, **HYPER)


def lstm_unavailable(backend):
    """Why FPTTLSTM(backend=...) cannot run in this test run, or None. Only cuda may be
    missing (no GPU, or an extension built without CUDA); cpu, reference and triton must
    run on every test machine, so there an error fails the test."""
    if backend != "cuda":
        return None
    if not torch.cuda.is_available():
        return "cuda backend: needs a GPU (torch.cuda.is_available() is False)"
    reason = segment_unavailable_reason("cuda", "cuda")
    return None if reason is None else f"cuda backend unavailable: {reason}"


def lstm_model(backend, loss, per_step, pg=None, seed=0):
    torch.manual_seed(seed)  # seeds the CUDA generators too: the same draw on every rank
    return fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend,
                              device=device_of(backend), process_group=pg, **HYPER)


def lstm_train(m, data):
    dev = m.weight_hh_l0.device
    return torch.cat([m.train_sequence(x.to(dev), y.to(dev), K).cpu() for x, y in data])


def snapshot(params, opt):
    """Everything the FPTT state holds, copied to the CPU: w, w_bar, lam, exp_avg,
    exp_avg_sq, step, and the status (last norm, skipped counts)."""
    return {"params": [p.detach().cpu().clone() for p in params],
            "state": [{n: t.cpu().clone() for n, t in opt.state[p].items()} for p in params],
            "status": opt._status.cpu().clone()}


# -- the ranks --------------------------------------------------------------------------------

def _worker(rank, world, init_file, out_dir):
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    pg = dist.group.WORLD
    res = {}
    # 1. fptt_fast.FPTT under DistributedDataParallel
    for backend in DDP_BACKENDS:
        net, model, opt = ddp_model(backend, seed=rank, pg=pg)  # ranks seeded differently
        ddp_train(net, opt, shard(batches(DDP_B)[:N_BATCHES], rank, world))
        res[f"ddp-{backend}"] = snapshot(list(model.parameters()), opt)
    # 2. FPTTLSTM(process_group=pg); ranks seeded differently: rank 0's parameters win
    ck_path = os.path.join(out_dir, "checkpoint.pt")
    for name, backend, loss, per_step, B in LSTM_CASES:
        if lstm_unavailable(backend) is not None:  # cuda without a GPU: its test skips
            continue
        data = shard(batches(B, loss, per_step), rank, world, per_step)
        t1 = time.perf_counter()
        m = lstm_model(backend, loss, per_step, pg, seed=10 + rank)
        losses = lstm_train(m, data[:N_BATCHES])
        res[name] = {**snapshot(m.fptt_parameters(), m.optimizer), "losses": losses,
                     "seconds": time.perf_counter() - t1}
        if backend != "cpu":
            continue
        # 3. checkpoint from rank 0, loaded by every rank into a freshly built module
        if rank == 0:
            torch.save({"model": m.state_dict(), "optimizer": m.optimizer.state_dict()}, ck_path)
        dist.barrier(group=pg)
        fresh = lstm_model(backend, loss, per_step, pg, seed=20 + rank)
        ck = torch.load(ck_path, weights_only=True)
        fresh.load_state_dict(ck["model"])
        fresh.optimizer.load_state_dict(ck["optimizer"])
        res["ck-loaded"] = snapshot(fresh.fptt_parameters(), fresh.optimizer)
        res["ck-resumed-losses"] = lstm_train(fresh, data[N_BATCHES:])
        res["ck-resumed"] = snapshot(fresh.fptt_parameters(), fresh.optimizer)
        lstm_train(m, data[N_BATCHES:])  # the same run, not interrupted
        res["ck-continued"] = snapshot(m.fptt_parameters(), m.optimizer)
    # 4. ranks that disagree: every rank raises ValueError at construction
    for field, value in (("hidden_size", H + rank), ("lr", LR * (1 + rank)),
                         ("clip", None if rank else 1.0), ("loss", ("mse", "ce")[rank])):
        kw = dict(backend="cpu", **HYPER)
        hidden = value if field == "hidden_size" else H
        if field != "hidden_size":
            kw[field] = value
        try:
            fptt_fast.FPTTLSTM(I, hidden, O, process_group=pg, **kw)
            res[f"mismatch-{field}"] = None
        except ValueError as e:
            res[f"mismatch-{field}"] = str(e)
    res["seconds"] = time.perf_counter() - t0
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier(group=pg)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """[rank 0's results, rank 1's results] and the run's folder; the spawn's wall time is
    printed (pytest -s)."""
    out = tmp_path_factory.mktemp("dist")
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the children's OpenMP pools: one thread each
    start = time.perf_counter()
    try:
        ctx = mp.start_processes(_worker, args=(WORLD, str(out / "rendezvous"), str(out)),
                                 nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_DEADLINE_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"the 2 gloo processes did not finish in {SPAWN_DEADLINE_S} s")
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    res = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    print(f"\n2 gloo processes: {time.perf_counter() - start:.1f} s in all, "
          f"{max(r['seconds'] for r in res):.1f} s after start-up")
    return res, out


@pytest.fixture(autouse=True)
def one_thread():
    """The one-process runs on one thread too (tiny matrices; on a busy 2-core machine a
    second spinning OpenMP thread slows them tenfold)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- comparisons ------------------------------------------------------------------------------

def max_scaled_err(a, b):
    """max over every tensor of max |a - b| / max |w| (w: b's parameters)."""
    scale = max(p.abs().max().item() for p in b["params"])
    errs = [(x.double() - y.double()).abs().max().item() / scale
            for x, y in zip(a["params"], b["params"])]
    for sa, sb in zip(a["state"], b["state"]):
        assert set(sa) == set(sb)
        for n in sa:
            if n == "step":
                assert sa[n].item() == sb[n].item(), f"step {sa[n]} vs {sb[n]}"
            else:
                errs.append((sa[n].double() - sb[n].double()).abs().max().item() / scale)
    return max(errs)


def assert_bitwise(a, b, what):
    for i, (x, y) in enumerate(zip(a["params"], b["params"])):
        assert torch.equal(x, y), f"{what}: parameter {i} differs between the ranks"
    for i, (sa, sb) in enumerate(zip(a["state"], b["state"])):
        for n in sa:
            assert torch.equal(sa[n], sb[n]), f"{what}: {n} of parameter {i} differs between the ranks"
    assert torch.equal(a["status"], b["status"]), f"{what}: status (norm, skips) differs"


def assert_matches_one_process(dist_res, one, half, what, tol=TOL_UPDATE):
    err = max_scaled_err(dist_res, one)
    assert err <= tol, f"{what}: {err:.3g} of max|w| from one process with all rows"
    # able to fail: rank 0's rows alone, without the all-reduce, are far off
    off = max_scaled_err(half, one)
    print(f"{what}: {err:.2g} of max|w| from one process; rank 0's rows alone: {off:.2g}")
    assert off > 100 * tol, f"{what}: the half-batch run is only {off:.3g} off"
    assert dist_res["status"][2].item() == 0, f"{what}: skipped steps"


# -- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", DDP_BACKENDS)
def test_fptt_under_ddp_matches_one_process(ranks, backend):
    (r0, r1), _ = ranks
    assert_bitwise(r0[f"ddp-{backend}"], r1[f"ddp-{backend}"], f"DDP + FPTT({backend})")
    data = batches(DDP_B)[:N_BATCHES]
    _, model, opt = ddp_model(backend)
    ddp_train(model, opt, data)
    one = snapshot(list(model.parameters()), opt)
    _, model, opt = ddp_model(backend)
    ddp_train(model, opt, shard(data, 0, WORLD))
    half = snapshot(list(model.parameters()), opt)
    assert_matches_one_process(r0[f"ddp-{backend}"], one, half, f"DDP + FPTT({backend})")


@pytest.mark.parametrize("name,backend,loss,per_step,B", LSTM_CASES, ids=[c[0] for c in LSTM_CASES])
def test_fpttlstm_process_group_matches_one_process(ranks, name, backend, loss, per_step, B):
    """The ranks' run against ONE process with all rows: for triton and cuda that one
    process runs the one-launch step (forward, gradients and update in one launch, and on
    cuda the K segments of a batch in one call), the ranks the split step."""
    reason = lstm_unavailable(backend)
    if reason is not None:
        pytest.skip(reason)
    (r0, r1), _ = ranks
    assert_bitwise(r0[name], r1[name], name)
    assert torch.equal(r0[name]["losses"], r1[name]["losses"]), f"{name}: losses differ between ranks"
    data = batches(B, loss, per_step)[:N_BATCHES]
    m = lstm_model(backend, loss, per_step, seed=10)  # rank 0's seed: its parameters win
    one_losses = lstm_train(m, data)
    one = snapshot(m.fptt_parameters(), m.optimizer)
    m = lstm_model(backend, loss, per_step, seed=10)
    lstm_train(m, shard(data, 0, WORLD, per_step))
    half = snapshot(m.fptt_parameters(), m.optimizer)
    assert_matches_one_process(r0[name], one, half, name, LSTM_TOL[backend])
    print(f"{name}: {r0[name]['seconds']:.1f} s on rank 0")
    # the loss returned is the global mean over all rows (4 + 3: weighted by rows)
    rel = ((r0[name]["losses"] - one_losses).abs() / one_losses.abs()).max().item()
    assert rel <= TOL_LOSS, f"{name}: global loss {rel:.3g} (relative) from the one-process loss"
    assert len(one_losses) == N_BATCHES * K


def test_checkpoint_from_rank0_loads_identically_on_every_rank(ranks):
    (r0, r1), out = ranks
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    saved = [ck["model"][n] for n in PARAM_NAMES]
    for r, res in enumerate((r0, r1)):
        for n, a, b in zip(PARAM_NAMES, res["ck-loaded"]["params"], saved):
            assert torch.equal(a, b), f"rank {r}: {n} after loading differs from the checkpoint"
    assert_bitwise(r0["ck-loaded"], r1["ck-loaded"], "loaded checkpoint")
    assert_bitwise(r0["ck-resumed"], r1["ck-resumed"], "resumed from the checkpoint")
    # resumed from the file = the run that went on without it, bitwise
    assert_bitwise(r0["ck-resumed"], r0["ck-continued"], "resumed vs uninterrupted")
    # and one process resuming the same file with all rows gives the same model
    name, backend, loss, per_step, B = LSTM_CASES[0]
    m = lstm_model(backend, loss, per_step, seed=99)
    m.load_state_dict(ck["model"])
    m.optimizer.load_state_dict(ck["optimizer"])
    lstm_train(m, batches(B, loss, per_step)[N_BATCHES:])
    err = max_scaled_err(r0["ck-resumed"], snapshot(m.fptt_parameters(), m.optimizer))
    assert err <= TOL_UPDATE, f"1 process resuming rank 0's checkpoint: {err:.3g} of max|w| off"


@pytest.mark.parametrize("field,values", [("hidden_size", "rank 0: 8, rank 1: 9"),
                                          ("lr", "rank 0: 0.01, rank 1: 0.02"),
                                          ("clip", "rank 0: 1, rank 1: 0"),
                                          ("loss", None)])
def test_ranks_that_disagree_raise_at_construction(ranks, field, values):
    (r0, r1), _ = ranks
    for r, res in enumerate((r0, r1)):
        msg = res[f"mismatch-{field}"]
        assert msg is not None, f"rank {r}: no ValueError for a {field} mismatch"
        assert f"disagree on {field} (" in msg, msg
        if values is not None:
            assert values in msg, msg
    assert r0[f"mismatch-{field}"] == r1[f"mismatch-{field}"]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("loss,per_step", [("mse", True), ("ce", False)])
def test_gradients_launch_has_its_update_off(fresh_seed, backend, loss, per_step):
    """The backend's segment with update=False, the first half of a data-parallel segment on the
    one-launch backends (the general kernel with config.update False):
    the loss, (h, c) and six gradients of the one-launch step, bitwise, and nothing of the
    parameters, the FPTT state or the optimiser's status touched, twice in a row (the
    second launch sees what the first left: the same results again). One process, no
    process group: the triton case runs on every machine."""
    reason = lstm_unavailable(backend)
    if reason is not None:
        pytest.skip(reason)
    dev = device_of(backend)
    Tg, Bg = 4, 5
    # the general kernel on cuda too: the gradients launch runs it (the persistent one has
    # no gradients-only mode), and the one-launch step it is compared with must as well
    kw = dict(HYPER, cuda_kernel="general") if backend == "cuda" else HYPER
    a = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend, device=dev,
                           **kw)
    lead = (Tg, Bg) if per_step else (Bg,)

    def draw():
        x = torch.randn(Tg, Bg, I, device=dev)
        y = (torch.randn(*lead, O, device=dev) if loss == "mse"
             else torch.randint(0, O, lead, device=dev))
        return x, y

    for _ in range(3):  # away from the start: w_bar != w, lam and the Adam moments non-zero
        a.train_segment(*draw())
    b = fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend=backend, device=dev,
                           **kw)
    b.load_state_dict(a.state_dict())
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    before = snapshot(b.fptt_parameters(), b.optimizer)
    assert before["status"][0].item() != 0  # the loaded status (last norm): not a fresh one
    x, y = draw()
    state = (torch.randn(Bg, H, device=dev), torch.randn(Bg, H, device=dev))
    weight = 0.25 + torch.rand(()).item()
    got = []
    for _ in range(2):
        loss_b, (h_b, c_b) = b._engine.segment(b, x, y, state, weight, False)
        got.append((loss_b.clone(), h_b, c_b, [g.clone() for g in b._grads]))
        after = snapshot(b.fptt_parameters(), b.optimizer)
        for n, u, v in zip(PARAM_NAMES, after["params"], before["params"]):
            assert torch.equal(u, v), f"{backend}: the gradients launch changed {n}"
        for n, su, sv in zip(PARAM_NAMES, after["state"], before["state"]):
            for k in su:
                assert torch.equal(su[k], sv[k]), f"{backend}: the gradients launch changed {k} of {n}"
        assert torch.equal(after["status"], before["status"]), f"{backend}: status changed"
    loss_a, (h_a, c_a) = a.train_segment(x, y, state, weight)  # writes a._grads, then updates
    for loss_b, h_b, c_b, grads_b in got:
        assert loss_b.shape == (1,) and torch.equal(loss_b[0], loss_a)
        assert torch.equal(h_b, h_a) and torch.equal(c_b, c_a)
        for n, ga, gb in zip(PARAM_NAMES, a._grads, grads_b):
            assert torch.equal(ga, gb), f"{backend}: gradient of {n} differs from the one-launch step's"
            assert gb.abs().max().item() > 0, n
    assert not torch.equal(a.weight_hh_l0, b.weight_hh_l0)  # a did update (able to fail)


def test_cuda_gradients_launch_arguments_pass_the_glue_checks(fresh_seed, monkeypatch):
    """Without a GPU, the cuda backend's gradients launch up to the launch: the arguments it
    gives _C.lstm_train_cuda pass the CUDA glue's own checks (tests/seam_checks.py, on CPU
    tensors, as the glue runs them before launching; without the update those are the
    gradients launch's), and they are those of one segment with the update switched off:
    config.update False, n_segs 1, no weight ramp, the general kernel, the module's
    gradient buffers. What the kernel then does with them needs a GPU:
    test_gradients_launch_has_its_update_off[cuda]."""
    cx = check_ext()
    m = fptt_fast.FPTTLSTM(I, H, O, loss="ce", backend="cpu", **HYPER)
    m.backend = "cuda"  # what the module resolves to on a GPU; the launch is faked below
    calls = []

    class Glue:
        @staticmethod
        def lstm_train_cuda(state, segment, config):
            dims = cx.lstm_segment_cuda(state, segment, config, "cpu")
            calls.append(dict(dims=tuple(dims), n_segs=config.n_segs, weight=config.weight,
                              ramp=config.ramp, update=config.update, grads=state.grads,
                              params=state.params, kernel=config.kernel))
            return 1  # "general"

    monkeypatch.setattr(cuda_backend, "_extension", lambda: Glue)
    x, y = torch.randn(T, 5, I), torch.randint(0, O, (5,))
    state = (torch.randn(5, H), torch.randn(5, H))
    for weight in (0.5, 1.0):
        loss, (h, c) = m._engine.segment(m, x, y, state, weight, False)
        assert loss.shape == (1,) and h.shape == c.shape == (5, H)
    assert len(calls) == 2 and m.last_kernel == "general"
    for call, weight in zip(calls, (0.5, 1.0)):
        assert call["dims"] == (T, 5, I, H, O)
        assert call["n_segs"] == 1 and call["ramp"] is False and call["weight"] == weight
        assert call["update"] is False and call["kernel"] == 0
        assert all(g is b for g, b in zip(call["grads"], m._grads))
        for p, q in zip(call["params"], m.fptt_parameters()):
            assert p.data_ptr() == q.data_ptr()


def test_process_group_argument_checked():
    for bad in ("world", 1, object()):
        with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
            fptt_fast.FPTTLSTM(I, H, O, backend="cpu", process_group=bad)


@pytest.mark.parametrize("batch,world", [(8, 2), (7, 2), (5, 3), (3, 3), (128, 8)])
def test_shard_rows_cover_the_batch_once(batch, world):
    rows = [distributed.shard_rows(batch, r, world) for r in range(world)]
    assert rows[0][0] == 0 and rows[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    sizes = [hi - lo for lo, hi in rows]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="at least one row"):
        distributed.shard_rows(world - 1, 0, world)


# -- the command line under torchrun ----------------------------------------------------------

# on the CPU (gloo), also where a GPU is present: two processes cannot share one GPU
# under NCCL, and this tests the command line, not the kernels
CLI_RUN = ["--T", "12", "--K", "3", "--hidden", "8", "--batch", "8", "--eval-every", "2",
           "--no-progress", "--device", "cpu"]


def _run(cmd, cwd, env=None):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return proc


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_rows_close(a, b, what):
    assert [r["step"] for r in a] == [r["step"] for r in b], what
    for ra, rb in zip(a, b):
        for col in ("train_loss", "test_mse"):
            if rb[col] == "":
                assert ra[col] == "", (what, ra)
                continue
            x, y = float(ra[col]), float(rb[col])
            assert abs(x - y) <= TOL_LOSS * abs(y), f"{what}, step {ra['step']}: {col} {x} vs {y}"


def _checkpoint_state(ck):
    params = [ck["model"][n] for n in PARAM_NAMES]
    state = [ck["optimizer"]["state"][i] for i in range(len(params))]
    return {"params": params, "state": state}


def test_cli_torchrun_matches_one_process_and_resumes_on_one(tmp_path):
    """torchrun --nproc-per-node 2 -m fptt_fast train add: 4 steps of 4 + 4 rows; the same
    curve as one process with 8 rows; its rank-0 checkpoint resumed by ONE process to step
    6 ends where the one-process run of 6 steps does (model, FPTT state, losses)."""
    one = _ok(_run([sys.executable, "-m", "fptt_fast", "train", "add", *CLI_RUN, "--steps", "6",
                    "--out", "one"], tmp_path))
    two = _ok(_run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2", "-m", "fptt_fast", "train", "add", *CLI_RUN,
                    "--steps", "4", "--out", "two"], tmp_path))
    assert "torchrun: 2 processes (gloo); each batch of 8 rows split into 4 rows" in two.stdout
    assert two.stdout.count("final [fptt]: step 4") == 1, two.stdout  # rank 0 prints alone
    assert "final [fptt]: step 6" in one.stdout
    base = _csv(tmp_path / "one" / "log.csv")
    _assert_rows_close(_csv(tmp_path / "two" / "log.csv"), base[:4], "2 processes vs 1")
    _ok(_run([sys.executable, "-m", "fptt_fast", "train", "add", "--resume", "two/checkpoint.pt",
              "--steps", "6", "--out", "resumed", "--no-progress"], tmp_path))
    _assert_rows_close(_csv(tmp_path / "resumed" / "log.csv"), base, "resumed on 1 process")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("resumed", "one"))
    assert a["step"] == b["step"] == 6 and torch.equal(a["data_rng"], b["data_rng"])
    err = max_scaled_err(_checkpoint_state(a), _checkpoint_state(b))
    assert err <= TOL_UPDATE, f"resumed model {err:.3g} of max|w| from the one-process run"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_ranks_with_other_options_stop_with_exit_2(tmp_path):
    """Two processes started by hand as torchrun would (RANK, WORLD_SIZE, MASTER_*), rank 1
    with another --steps: both refuse with exit code 2, naming the option, and write nothing."""
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = []
    for rank, steps in ((0, "4"), (1, "5")):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fptt_fast", "train", "add", *CLI_RUN, "--steps", steps, "--out", "run"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), **env}))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 2, f"rank {rank}: exit {p.returncode}\n{out}\n{err}"
        assert "disagree on steps (rank 0: 4, rank 1: 5)" in err, err
        prefix = "[rank 1] fptt-fast: error:" if rank else "fptt-fast: error:"
        assert any(line.startswith(prefix) for line in err.splitlines()), err
    assert not (tmp_path / "run").exists()


class _Exited(Exception):
    pass


@pytest.mark.parametrize("raised,code,printed", [
    (None, 0, ""), (SystemExit(2), 2, ""), (SystemExit(None), 0, ""),
    (RuntimeError("gloo: connection reset"), 1, "RuntimeError: gloo: connection reset")])
def test_cli_leaves_through_os_exit_once_a_group_started(monkeypatch, capsys, raised, code, printed):
    """cli.main after _start_distributed made a group: whatever _main did (returned, exited,
    raised), the process leaves through os._exit with the code Python would give, the
    traceback printed, never through interpreter shutdown (the gloo SIGABRT race)."""
    from fptt_fast import cli

    def fake_main(argv):
        if raised is not None:
            raise raised
        return 0

    def fake_exit(c):
        raise _Exited(c)

    monkeypatch.setattr(cli, "_main", fake_main)
    monkeypatch.setattr(cli, "_GROUP_STARTED", [True])
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(_Exited) as e:
        cli.main([])
    assert e.value.args == (code,)
    assert printed in capsys.readouterr().err
    monkeypatch.setattr(cli, "_GROUP_STARTED", [])  # without a group: Python's own way
    if raised is None:
        assert cli.main([]) == 0
    else:
        with pytest.raises(type(raised)):
            cli.main([])


@pytest.mark.parametrize("sizes,bytes_", [((2, 128, 1), "270,860"), ((32, 512, 10), "4,493,360")])
def test_readme_all_reduce_bytes(sizes, bytes_):
    """README, "Scaling out": the bytes all-reduced per update are (P + 2) float32."""
    m = fptt_fast.FPTTLSTM(*sizes, backend="reference")
    P = sum(p.numel() for p in m.fptt_parameters())
    assert f"{(P + 2) * 4:,}" == bytes_
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read()
    section = readme[readme.index("## Scaling out"):]
    assert f"| {P:,} | {bytes_} (" in section, f"README's row for {sizes} does not say P={P:,}, {bytes_} B"
