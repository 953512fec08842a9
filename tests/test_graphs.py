"""CUDA graphs as a mode: FPTTLSTM.train_sequence(graph=None/True) on the cuda
backend and FPTT(graph=True) on the cuda and triton backends, against eager runs of the
same seeds: bitwise-identical parameters, FPTT state and losses over several calls, a
shape change captures anew, hyper-parameter changes are honoured. GPU only (they skip
without CUDA); the argument checks run everywhere."""
import pytest
import torch

import fptt_fast
from fptt_fast import backends

CUDA = torch.cuda.is_available() and backends.unavailable_reason("cuda", "cuda") is None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA extension")


def test_graph_arguments_are_checked():
    m = fptt_fast.FPTTLSTM(2, 3, 1, backend="reference")
    x, y = torch.randn(4, 2, 2), torch.randn(2, 1)
    with pytest.raises(ValueError, match="graph=True needs the cuda backend"):
        m.train_sequence(x, y, 2, graph=True)
    with pytest.raises(ValueError, match="graph must be"):
        m.train_sequence(x, y, 2, graph="yes")
    assert m.train_sequence(x, y, 2, graph=False).shape == (2,)
    assert m.train_sequence(x, y, 2).shape == (2,)  # None: eager off the cuda backend
    with pytest.raises(ValueError, match="graph=True needs the cuda or triton backend"):
        fptt_fast.FPTT([torch.randn(3, requires_grad=True)], backend="reference", graph=True)
    with pytest.raises(ValueError, match="graph must be True or False"):
        fptt_fast.FPTT([torch.randn(3, requires_grad=True)], backend="reference", graph=1)


def lstm_state(m):
    out = [p.detach().clone() for p in m.fptt_parameters()]
    for p in m.fptt_parameters():
        out += [t.clone() for _, t in sorted(m.optimizer.state[p].items())]
    return out + [m.optimizer._status.clone()]


def assert_equal_lists(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"tensor {i} differs"


def lstm_pair(loss, per_step, kernel, seed=0):
    ms = []
    for _ in range(2):
        torch.manual_seed(seed)
        ms.append(fptt_fast.FPTTLSTM(3, 16, 2, loss=loss, per_step=per_step, optimizer="adam",
                                     lr=1e-2, clip=1.0, backend="cuda", device="cuda",
                                     cuda_kernel=kernel))
    return ms


def batch(T, B, loss, per_step, gen):
    x = torch.randn(T, B, 3, device="cuda", generator=gen)
    lead = (T, B) if per_step else (B,)
    y = (torch.randn(*lead, 2, device="cuda", generator=gen) if loss == "mse"
         else torch.randint(0, 2, lead, device="cuda", generator=gen))
    return x, y


@needs_cuda
@pytest.mark.parametrize("loss,per_step,kernel", [("mse", False, "auto"), ("ce", True, "auto"),
                                                  ("mse", False, "general")])
def test_train_sequence_graph_is_bitwise_eager(loss, per_step, kernel):
    """Several batches (new values each call, a given state on some), an lr schedule, a
    shape change and back: graphed (the default) and eager stay bitwise equal; one capture
    per shape, none for an lr change."""
    eager, graphed = lstm_pair(loss, per_step, kernel)
    gen = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(12, 8, 3)] * 3 + [(10, 4, 2)] * 2 + [(12, 8, 3)] * 2
    for k, (T, B, K) in enumerate(shapes):
        x, y = batch(T, B, loss, per_step, gen)
        state = None
        if k % 2:
            state = (torch.randn(B, 16, device="cuda", generator=gen),
                     torch.randn(B, 16, device="cuda", generator=gen))
        le = eager.train_sequence(x, y, K, state=state, graph=False)
        lg = graphed.train_sequence(x, y, K, state=state)
        assert torch.equal(le, lg), f"call {k}: losses differ"
        assert_equal_lists(lstm_state(eager), lstm_state(graphed))
        for m in (eager, graphed):
            m.optimizer.param_groups[0]["lr"] *= 0.7  # honoured without a new capture
    assert len(graphed._graphs) == 2  # one graph per shape
    assert eager.__dict__.get("_graphs") is None
    assert graphed.last_kernel == eager.last_kernel
    assert graphed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.7 ** len(shapes))
    graphed.optimizer.check_finite()


@needs_cuda
def test_train_sequence_graph_recaptures_on_clip_and_parameter_changes():
    eager, graphed = lstm_pair("mse", False, "auto", seed=2)
    gen = torch.Generator(device="cuda").manual_seed(3)
    x, y = batch(8, 4, "mse", False, gen)
    for m in (eager, graphed):
        m.train_sequence(x, y, 2, graph=m is graphed)
    for m in (eager, graphed):
        m.optimizer.clip = 0.05  # a kernel argument: a new capture
        m.train_sequence(x, y, 2, graph=m is graphed)
    assert len(graphed._graphs) == 2
    new = torch.randn_like(graphed.weight_hh_l0)
    for m in (eager, graphed):
        m.weight_hh_l0.data = new.clone()  # another address: a new capture
        m.train_sequence(x, y, 2, graph=m is graphed)
    assert len(graphed._graphs) == 3
    assert not torch.equal(graphed.weight_hh_l0, new)  # the new memory was updated
    assert_equal_lists(lstm_state(eager), lstm_state(graphed))


def opt_pair(backend, seed=0):
    torch.manual_seed(seed)
    shapes = [(64, 16), (64,), (7, 3), (1,)]
    p0 = [torch.randn(s, device="cuda") for s in shapes]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}]  # noqa: E731
    pe = [t.clone().requires_grad_() for t in p0]
    pg = [t.clone().requires_grad_() for t in p0]
    kw = dict(lr=1e-2, optimizer="adamw", weight_decay=0.1, clip=1.0, backend=backend)
    return (pe, fptt_fast.FPTT(groups(pe), **kw)), (pg, fptt_fast.FPTT(groups(pg), graph=True, **kw))


def opt_state(ps, o):
    out = [p.detach().clone() for p in ps]
    for p in ps:
        out += [t.clone() for _, t in sorted(o.state[p].items())]
    return out + [o._status.clone()]


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fptt_graph_step_is_bitwise_eager(backend):
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(f"backend {backend} unavailable: {backends.unavailable_reason(backend, 'cuda')}")
    (pe, oe), (pg, og) = opt_pair(backend)
    gen = torch.Generator(device="cuda").manual_seed(4)
    for k in range(10):
        grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in pe]
        for ps in (pe, pg):
            for p, g in zip(ps, grads):
                if p.grad is None or k == 6:  # step 6: new gradient tensors (a new capture)
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)  # the same buffers: replays
        if k == 3:
            for o in (oe, og):
                o.param_groups[1]["lr"] = 0.02  # a table value: honoured by the replay
                o.param_groups[0]["betas"] = (0.8, 0.95)
        if k == 8:
            for o in (oe, og):
                o.clip = 0.1  # a kernel argument: a new capture
        oe.step()
        og.step()
        assert_equal_lists(opt_state(pe, oe), opt_state(pg, og))
    assert og._graph_captures == 3 and len(og._graphs) == 3
    assert not oe._graphs
    og.check_finite()


# -- FPTT_FAST_STATUS=mapped: the status in mapped pinned host memory ----------------------
# Not the default until these have run on a GPU (benchmarks/NOTES.md).

def mapped_env(monkeypatch, on):
    if on:
        monkeypatch.setenv("FPTT_FAST_STATUS", "mapped")
    else:
        monkeypatch.delenv("FPTT_FAST_STATUS", raising=False)


def values_of(ps, o):
    """Parameters, FPTT state and the status (a mapped status read through its host view)."""
    out = [p.detach().clone() for p in ps]
    for p in ps:
        out += [t.clone() for _, t in sorted(o.state[p].items())]
    return out + [o._status_values().to(ps[0].device)]


def assert_status_round_trip(o, fresh, skipped):
    """o's state_dict loaded into fresh: the same status, `skipped` steps counted."""
    fresh.load_state_dict(o.state_dict())
    assert fresh._status_values().tolist() == o._status_values().tolist()
    assert fresh.skipped_steps == o.skipped_steps == skipped


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mapped_status_is_ignored_off_the_gpu_backends(backend, monkeypatch):
    """FPTT_FAST_STATUS=mapped changes nothing where it does not apply (CPU tensors; the
    reference backend anywhere): a plain status, the counts kept through a state_dict."""
    mapped_env(monkeypatch, True)
    torch.manual_seed(10)
    ps = [torch.randn(5, 3, requires_grad=True)]
    o = fptt_fast.FPTT(ps, lr=1e-2, nonfinite="skip", backend=backend)
    assert o._status_host is None and o._skip_word is None
    for k in range(3):
        ps[0].grad = torch.randn(5, 3)
        if k == 1:
            ps[0].grad[2, 2] = float("nan")
        o.step()
    assert o.skipped_steps == 1
    assert_status_round_trip(o, fptt_fast.FPTT([t.detach().clone().requires_grad_() for t in ps],
                                               lr=1e-2, nonfinite="skip", backend=backend), 1)


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_mapped_status_is_bitwise_the_device_status(backend, monkeypatch):
    """Twelve steps, two of them with a NaN gradient (nonfinite="skip"), eager and graphed:
    optimisers whose status lives in mapped host memory end bitwise where the default one
    does, skipped counts included; a state_dict round trip into a fresh mapped optimiser
    keeps the status."""
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(f"backend {backend} unavailable: {backends.unavailable_reason(backend, 'cuda')}")
    torch.manual_seed(5)
    shapes = [(64, 16), (64,), (7, 3), (1,)]
    p0 = [torch.randn(s, device="cuda") for s in shapes]
    kw = dict(lr=1e-2, optimizer="adam", clip=1.0, nonfinite="skip", backend=backend)
    runs = []
    for mapped in (False, True):
        mapped_env(monkeypatch, mapped)
        for graph in (False, True):
            ps = [t.clone().requires_grad_() for t in p0]
            o = fptt_fast.FPTT(ps, graph=graph, **kw)
            assert (o._status_host is not None) == mapped
            runs.append((ps, o))
    mapped_env(monkeypatch, False)
    gen = torch.Generator(device="cuda").manual_seed(6)
    for k in range(12):
        grads = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
        if k in (4, 9):
            grads[1][3] = float("nan")
        for ps, o in runs:
            for p, g in zip(ps, grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)  # the same buffers: graph mode replays
            o.step()
    want = values_of(*runs[0])
    for ps, o in runs[1:]:
        assert_equal_lists(want, values_of(ps, o))
    for _, o in runs:
        assert o.skipped_steps == 2
    ps, o = runs[2]
    mapped_env(monkeypatch, True)
    assert_status_round_trip(o, fptt_fast.FPTT([t.clone().requires_grad_() for t in p0], **kw), 2)


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_mapped_status_raises_at_a_later_step(backend, monkeypatch):
    """nonfinite="raise" with a mapped status: no event or copy queued per step; once the
    device has finished a step whose gradient held a NaN, the next step() raises before
    launching anything, and check_finite() waits for the device itself."""
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(f"backend {backend} unavailable: {backends.unavailable_reason(backend, 'cuda')}")
    mapped_env(monkeypatch, True)
    torch.manual_seed(7)
    ps = [torch.randn(8, 4, device="cuda", requires_grad=True)]
    o = fptt_fast.FPTT(ps, lr=1e-2, backend=backend)
    mapped_env(monkeypatch, False)
    assert o._skip_word is not None and o.nonfinite == "raise"
    ps[0].grad = torch.randn(8, 4, device="cuda")
    o.step()
    ps[0].grad[0, 0] = float("nan")
    o.step()
    assert o._pending is None and o._count_host is None  # nothing queued
    torch.cuda.synchronize()
    w = ps[0].detach().clone()
    ps[0].grad.normal_()
    with pytest.raises(FloatingPointError, match="1 step"):
        o.step()
    torch.cuda.synchronize()
    assert torch.equal(ps[0].detach(), w)  # the raising step launched nothing
    o.step()  # reported once: the run goes on
    ps[0].grad[1, 1] = float("inf")
    o.step()
    with pytest.raises(FloatingPointError, match="1 step"):
        o.check_finite()
    assert o.skipped_steps == 2


@needs_cuda
def test_mapped_status_lstm_graph_is_bitwise_the_device_status(monkeypatch):
    """FPTTLSTM.train_sequence on cuda (CUDA-graph replays, the default) with the status in
    mapped host memory: bitwise the default run."""
    runs = []
    for mapped in (False, True):
        mapped_env(monkeypatch, mapped)
        torch.manual_seed(8)
        m = fptt_fast.FPTTLSTM(3, 16, 2, optimizer="adam", lr=1e-2, clip=1.0, backend="cuda",
                               device="cuda")
        assert (m.optimizer._status_host is not None) == mapped
        runs.append(m)
    mapped_env(monkeypatch, False)
    gen = torch.Generator(device="cuda").manual_seed(9)
    for _ in range(4):
        x, y = batch(12, 8, "mse", False, gen)
        losses = [m.train_sequence(x, y, 3) for m in runs]
        assert torch.equal(*losses)
    a, b = [values_of(list(m.fptt_parameters()), m.optimizer) for m in runs]
    assert_equal_lists(a, b)
    for m in runs:
        m.optimizer.check_finite()
