"""The cpu backend's host path: FPTT.step() and FPTTLSTM.train_segment as one
C++ call each, through plans built once (_C.CpuUpdatePlan, _C.CpuLstmPlan).

The previous path, the list bindings (_C.fused_update_cpu, _C.lstm_segment_step_cpu) fed
with lists gathered in Python on every call, is still in the package: FPTT takes it for
gradients the plan does not take, and the tests below force it (`list_path`) to hold the
plan to bitwise-identical parameters, FPTT state and status over 20+ steps, and to the
reference within the project's tolerances. Then: what can change between steps (lr
schedulers, load_state_dict, clip, a parameter's data, a group, gradients that come, go or
move) is honoured, and what the plan must refuse is refused as before.

Seeds are fixed (deterministic runs).
"""
import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fptt_fast
from fptt_fast import backends
from fptt_fast.backends.cpu import CpuBackend
from fptt_fast.lstm import LOSS_CODE
from fptt_fast.optim import FPTT, STATUS_SKIPPED
from fptt_fast.seam import SegmentConfig, SegmentIO

from .utils import (LSTM_OPT, NONE_GRAD, SHAPES_CPU, SPLIT, TOL_UPDATE, assert_bitwise_equal,
                    assert_norm_close, assert_unchanged, compare, draw_grads, make_pair,
                    make_target, set_grads, snapshot, two_groups)

STEPS = 22

CASES = {
    "adam": dict(optimizer="adam", lr=1e-2, weight_decay=0.01, rho=0.5, c=1.5, clip=1.0),
    "adamw": dict(optimizer="adamw", lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), clip=None),
    "sgd": dict(optimizer="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.01,
                rho=0.5, c=1.5, alpha=0.4, beta=0.6, clip=0.5),
}


def list_path(opt):
    """Make `opt` (backend cpu) take the list path on every step: gathered lists into
    _C.fused_update_cpu and the status recorded in Python, as before the plan."""
    opt._plan_step = lambda: None
    return opt


def triple(case, shapes=SHAPES_CPU, seed=0, **kw):
    """The same parameters and FPTT state under the plan (pa, oa), the list path (pl, ol) and
    the reference (pb, ob), in two groups, from a random FPTT state."""
    torch.manual_seed(seed)
    kw = {**CASES[case], **kw}
    pa, pb, oa, ob = make_pair("cpu", shapes, split=SPLIT, group1=two_groups(kw["lr"]),
                               random_state=True, **kw)
    pl = [p.clone() for p in pa]
    groups = [{"params": pl[:SPLIT]}, {"params": pl[SPLIT:], **two_groups(kw["lr"])}]
    ol = list_path(fptt_fast.FPTT(groups, backend="cpu", **kw))
    for a, b in zip(pa, pl):
        for name, t in oa.state[a].items():
            ol.state[b][name].copy_(t)
    return pa, pl, pb, oa, ol, ob


def step_all(params_opts, grads, reuse=True):
    for ps, o in params_opts:
        set_grads(ps, grads, reuse)
        o.step()


def check_step(pa, pl, pb, oa, ol, ob):
    assert_bitwise_equal(pa, pl, oa, ol)
    compare(pa, pb, oa, ob, TOL_UPDATE)
    assert_norm_close(oa, ob)


@pytest.mark.parametrize("case", list(CASES))
def test_plan_is_bitwise_the_list_path_and_follows_the_reference(case):
    pa, pl, pb, oa, ol, ob = triple(case)
    gen = torch.Generator().manual_seed(1)
    for k in range(STEPS):
        # parameter NONE_GRAD has no gradient on odd steps: the active set changes
        grads = [None if (i == NONE_GRAD and k % 2) else torch.randn(p.shape, generator=gen)
                 for i, p in enumerate(pa)]
        step_all([(pa, oa), (pl, ol), (pb, ob)], grads)
        check_step(pa, pl, pb, oa, ol, ob)
    assert oa._plan is not None and ol._plan is None
    steps = {int(oa.state[p]["step"]) for i, p in enumerate(pa) if i != NONE_GRAD}
    assert steps == {STEPS}
    assert int(oa.state[pa[NONE_GRAD]]["step"]) == STEPS // 2


def test_hot_path_gathers_nothing_in_python(monkeypatch):
    """After the first step, steps with new gradient values in the same buffers and
    unchanged hyper-parameters neither gather lists nor re-key the hyper table nor rebuild
    the plan nor enter the slow path: step() is the plan's one call."""
    pa, pl, pb, oa, ol, ob = triple("adam")
    gen = torch.Generator().manual_seed(2)
    grads = lambda: [torch.randn(p.shape, generator=gen) for p in pa]  # noqa: E731
    step_all([(pa, oa), (pl, ol)], grads())
    plan = oa._plan

    def forbidden(*a, **k):
        raise AssertionError("a slow-path method ran on the hot path")

    # instance attributes of oa only: ol (the list path) keeps its methods
    for name in ("_gather", "_hyper_table", "refresh_cpu_plan", "_record", "_plan_step",
                 "_raise_pending", "device_step_begin"):
        monkeypatch.setattr(oa, name, forbidden)
    for _ in range(5):
        step_all([(pa, oa), (pl, ol)], grads())
        assert_bitwise_equal(pa, pl, oa, ol)
    assert oa._plan is plan


def test_lr_scheduler_refreshes_the_table_in_place():
    pa, pl, pb, oa, ol, ob = triple("adam")
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.85 ** k) for o in (oa, ol, ob)]
    gen = torch.Generator().manual_seed(3)
    plan, hyper_ptr = None, None
    for k in range(STEPS):
        step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
        for s in scheds:
            s.step()
        check_step(pa, pl, pb, oa, ol, ob)
        if plan is None:
            plan, hyper_ptr = oa._plan, oa._hyper.data_ptr()
        assert oa._plan is plan and oa._hyper.data_ptr() == hyper_ptr  # refreshed, not rebuilt
    assert oa.param_groups[0]["lr"] == pytest.approx(CASES["adam"]["lr"] * 0.85 ** STEPS)
    assert oa._hyper[0, 0].item() == pytest.approx(CASES["adam"]["lr"] * 0.85 ** (STEPS - 1))
    del gen


def test_every_hyper_parameter_change_is_honoured():
    """Each field of the table changed in turn, between steps, in group 1 (betas, nesterov
    included): the plan and the list path stay bitwise equal, and track the reference."""
    pa, pl, pb, oa, ol, ob = triple("sgd")
    changes = [("lr", 0.02), ("alpha", 0.6), ("beta", 0.3), ("rho", 0.2), ("c", 0.9),
               ("weight_decay", 0.05), ("momentum", 0.5), ("dampening", 0.0), ("nesterov", False),
               ("dampening", 0.3)]
    torch.manual_seed(4)
    for key, value in changes:
        for o in (oa, ol, ob):
            o.param_groups[1][key] = value
        step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
        check_step(pa, pl, pb, oa, ol, ob)
    # a tensor lr (torch's optimisers allow one), then changed in place
    for o in (oa, ol):
        o.param_groups[0]["lr"] = torch.tensor(0.01)
    ob.param_groups[0]["lr"] = 0.01
    step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
    check_step(pa, pl, pb, oa, ol, ob)
    for o in (oa, ol):
        o.param_groups[0]["lr"].fill_(0.004)
    ob.param_groups[0]["lr"] = float(torch.tensor(0.004))
    step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
    check_step(pa, pl, pb, oa, ol, ob)
    assert oa._hyper[0, 0].item() == pytest.approx(0.004)
    pa, pl, pb, oa, ol, ob = triple("adam", seed=5)
    for key, value in (("betas", (0.7, 0.95)), ("eps", 1e-3), ("betas", [0.8, 0.9])):
        for o in (oa, ol, ob):
            o.param_groups[1][key] = value
        step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
        check_step(pa, pl, pb, oa, ol, ob)


def test_bad_hyper_parameter_later_raises_and_changes_nothing():
    pa, pl, pb, oa, ol, ob = triple("adam")
    step_all([(pa, oa)], draw_grads(pa))
    for key, value in (("lr", -1.0), ("beta", 0.0), ("alpha", float("nan")), ("betas", (1.0, 0.9))):
        good = oa.param_groups[1][key]
        oa.param_groups[1][key] = value
        set_grads(pa, draw_grads(pa))
        snap = snapshot(pa, oa)
        with pytest.raises(ValueError, match=key.rstrip("s")):
            oa.step()
        assert_unchanged(pa, oa, snap)
        oa.param_groups[1][key] = good
    oa.step()  # and a good value again steps


def test_clip_change_is_honoured():
    pa, pl, pb, oa, ol, ob = triple("adam")
    torch.manual_seed(6)
    for clip in (1.0, 0.05, None, 0.3):
        for o in (oa, ol, ob):
            o.clip = clip
        step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
        check_step(pa, pl, pb, oa, ol, ob)
    for o in (oa, ol):  # a raw 0 means no clipping to the kernels (the reference needs None)
        o.clip = 0
    step_all([(pa, oa), (pl, ol)], draw_grads(pa))
    assert_bitwise_equal(pa, pl, oa, ol)
    oa.clip = -1.0  # refused by the shared checks, as the list binding refuses it
    with pytest.raises(RuntimeError, match="clip"):
        oa.step()


def test_state_dict_round_trip_is_bitwise():
    pa, pl, pb, oa, ol, ob = triple("adamw")
    torch.manual_seed(7)
    grads = [draw_grads(pa) for _ in range(10)]
    for g in grads[:5]:
        step_all([(pa, oa)], g)
    sd = copy.deepcopy(oa.state_dict())
    saved = [p.detach().clone() for p in pa]
    for g in grads[5:]:
        step_all([(pa, oa)], g)
    # a fresh optimiser (its plan built after the load) and the first one loaded back (its
    # plan dropped by the load) both continue bitwise as the uninterrupted run
    for reuse_opt in (False, True):
        pc = [s.clone() for s in saved]
        if reuse_opt:
            oc = fptt_fast.FPTT([{"params": pc[:SPLIT]}, {"params": pc[SPLIT:]}], backend="cpu",
                                **CASES["adamw"])
            for g in grads[:2]:  # a plan exists and the state moved on before the load
                step_all([(pc, oc)], g)
            with torch.no_grad():
                for p, s in zip(pc, saved):
                    p.copy_(s)
        else:
            oc = fptt_fast.FPTT([{"params": pc[:SPLIT]}, {"params": pc[SPLIT:]}], backend="cpu",
                                **CASES["adamw"])
        oc.load_state_dict(copy.deepcopy(sd))
        for g in grads[5:]:
            step_all([(pc, oc)], g)
        assert_bitwise_equal(pa, pc, oa, oc)
        assert oc._plan is not None


def test_loaded_hyper_parameters_are_honoured():
    """load_state_dict carrying another lr and beta into an optimiser whose plan exists:
    the next steps use them (bitwise as the list path loaded likewise)."""
    pa, pl, pb, oa, ol, ob = triple("adam")
    torch.manual_seed(8)
    step_all([(pa, oa), (pl, ol)], draw_grads(pa))
    sd = copy.deepcopy(oa.state_dict())
    sd["param_groups"][0]["lr"] = 0.05
    sd["param_groups"][1]["beta"] = 0.9
    before = [p.detach().clone() for p in pa]
    for o in (oa, ol):
        o.load_state_dict(copy.deepcopy(sd))
    with torch.no_grad():
        for a, b in zip(pl, before):
            a.copy_(b)
    for _ in range(3):
        step_all([(pa, oa), (pl, ol)], draw_grads(pa))
        assert_bitwise_equal(pa, pl, oa, ol)
    assert oa._hyper[0, 0].item() == pytest.approx(0.05)
    assert oa._hyper[1, 2].item() == pytest.approx(0.9)


def test_replaced_parameter_data_rebuilds_the_plan():
    pa, pl, pb, oa, ol, ob = triple("adam")
    torch.manual_seed(9)
    step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
    plan = oa._plan
    new = torch.randn(pa[0].shape)
    for p in (pa[0], pl[0], pb[0]):
        p.data = new.clone()  # a new data pointer behind the same parameter object
    for _ in range(3):
        step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
        check_step(pa, pl, pb, oa, ol, ob)
    assert oa._plan is not plan
    assert not torch.equal(pa[0], new)  # the new memory is what was updated


def test_changed_groups_rebuild_the_plan():
    pa, pl, pb, oa, ol, ob = triple("sgd")
    torch.manual_seed(10)
    step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
    plan = oa._plan
    # add_param_group: a third group, with its own lr
    extra = torch.randn(17)
    for ps, o in ((pa, oa), (pl, ol), (pb, ob)):
        q = extra.clone()
        ps.append(q)
        o.add_param_group({"params": [q], "lr": 0.01})
    for _ in range(3):
        step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
        check_step(pa, pl, pb, oa, ol, ob)
    assert oa._plan is not plan
    plan = oa._plan
    # a group's params list replaced by an equal new list, and its dict by a copy
    oa.param_groups[0]["params"] = list(oa.param_groups[0]["params"])
    step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
    assert oa._plan is not plan
    plan = oa._plan
    oa.param_groups[1] = dict(oa.param_groups[1])
    step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa))
    assert oa._plan is not plan
    check_step(pa, pl, pb, oa, ol, ob)


def test_gradients_that_move_come_and_go():
    """Fresh gradient tensors every step (zero_grad(set_to_none=True) style), a gradient
    dropped then back, and a non-contiguous one (the list path's copy): bitwise the list
    path, and back on the plan afterwards."""
    pa, pl, pb, oa, ol, ob = triple("adamw")
    torch.manual_seed(11)
    for k in range(6):
        step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa, none_idx=k % 3), reuse=False)
        check_step(pa, pl, pb, oa, ol, ob)
    plan = oa._plan
    grads = draw_grads(pa)
    for ps, o in ((pa, oa), (pl, ol), (pb, ob)):
        set_grads(ps, grads)
        ps[0].grad = grads[0].t().contiguous().t()  # same values, transposed strides
        assert not ps[0].grad.is_contiguous()
        o.step()
    check_step(pa, pl, pb, oa, ol, ob)
    step_all([(pa, oa), (pl, ol), (pb, ob)], draw_grads(pa), reuse=False)
    check_step(pa, pl, pb, oa, ol, ob)
    assert oa._plan is plan


def test_refused_gradients_change_nothing():
    pa, pl, pb, oa, ol, ob = triple("adam")
    torch.manual_seed(12)
    step_all([(pa, oa)], draw_grads(pa))

    def resized(g):  # torch's p.grad setter refuses other sizes and dtypes, not these
        g.resize_(g.numel() + 1)

    def retyped(g):
        g.data = g.data.double()

    # (message, error, a gradient for pa[2], or a change made to the one drawn)
    cases = [
        ("sparse", ValueError, lambda g: g.to_sparse()),
        ("shape", ValueError, resized),
        ("dtype torch.float64", ValueError, retyped),
        # a gradient sharing memory with a tensor the step writes: the shared checks refuse
        ("shares memory", RuntimeError, lambda g: oa.state[pa[2]]["lam"]),
        ("shares memory", RuntimeError, lambda g: pa[2].detach()),
    ]
    for match, err, change in cases:
        set_grads(pa, draw_grads(pa), reuse=False)  # never copy into last case's gradient
        g = change(pa[2].grad)
        if g is not None:
            pa[2].grad = g
        snap = snapshot(pa, oa)
        with pytest.raises(err, match=match):
            oa.step()
        assert_unchanged(pa, oa, snap)
    set_grads(pa, draw_grads(pa), reuse=False)
    oa.step()


def test_hooks_and_profiler_still_run():
    pa, pl, pb, oa, ol, ob = triple("adam")
    calls = []
    handles = [oa.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               oa.register_step_post_hook(lambda o, a, k: calls.append("post")),
               register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre"))]
    torch.manual_seed(13)
    try:
        for _ in range(3):
            step_all([(pa, oa), (pl, ol)], draw_grads(pa))
            assert_bitwise_equal(pa, pl, oa, ol)
    finally:
        for h in handles:
            h.remove()
    # the global hook also saw the list-path optimiser's steps
    assert calls.count("pre") == 3 and calls.count("post") == 3
    assert calls.count("global pre") == 6
    step_all([(pa, oa)], draw_grads(pa))
    assert len(calls) == 12  # hooks removed: the hot path calls nothing
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step_all([(pa, oa)], draw_grads(pa))
    assert "Optimizer.step#FPTT.step" in {e.name for e in prof.events()}


def test_closure_is_called_and_its_loss_returned():
    pa, pl, pb, oa, ol, ob = triple("adam")
    step_all([(pa, oa), (pl, ol)], draw_grads(pa))
    grads = draw_grads(pa)

    def closure():
        set_grads(pa, grads)
        assert torch.is_grad_enabled()
        return torch.tensor(3.0)

    assert oa.step(closure).item() == 3.0
    set_grads(pl, grads)
    ol.step()
    assert_bitwise_equal(pa, pl, oa, ol)


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nonfinite_gradient_on_the_plan(nonfinite):
    pa, pl, pb, oa, ol, ob = triple("adam", nonfinite=nonfinite)
    torch.manual_seed(14)
    step_all([(pa, oa), (pl, ol)], draw_grads(pa))
    for bad in (float("inf"), float("nan")):
        grads = draw_grads(pa)
        grads[1][0] = bad
        snap = snapshot(pa, oa)
        for ps, o in ((pa, oa), (pl, ol)):
            set_grads(ps, grads)
            if nonfinite == "raise":
                with pytest.raises(FloatingPointError):
                    o.step()
            else:
                o.step()
        assert_unchanged(pa, oa, snap)
        assert_bitwise_equal(pa, pl, oa, ol)
    assert oa.skipped_steps == 2
    assert oa._status[STATUS_SKIPPED].item() == 2.0
    step_all([(pa, oa), (pl, ol)], draw_grads(pa))  # a finite step raises nothing
    assert_bitwise_equal(pa, pl, oa, ol)


def test_no_gradient_and_no_parameter():
    p = torch.randn(4)
    opt = fptt_fast.FPTT([p], backend="cpu")
    opt.param_groups[0]["lr"] = -1.0  # as the list path: no gradient, nothing validated
    assert opt.step() is None and opt._plan is None
    opt.param_groups[0]["lr"] = 1e-3
    p.grad = torch.randn(4)
    opt.step()
    p.grad = None
    w = p.clone()
    opt.step()  # the plan, with nothing to do
    assert torch.equal(p, w) and opt.state[p]["step"].item() == 1
    empty = fptt_fast.FPTT([{"params": []}], backend="cpu")
    assert empty.step() is None


def test_plan_copies_to_none():
    pa, pl, pb, oa, ol, ob = triple("adam")
    step_all([(pa, oa)], draw_grads(pa))
    assert copy.deepcopy(oa._plan) is None  # raw pointers: a copy must build its own


# ---- FPTTLSTM.train_segment ------------------------------------------------------------

def lstm_list_path(self, x, target, state, weight, update):
    """The cpu backend's segment before the plan: every list gathered, the list binding
    _C.lstm_segment_step_cpu, the hyper table re-keyed (kernel_state) and the skips reported
    from Python."""
    ext = backends.extension()
    if self._grads is None:
        self._grads = [torch.zeros_like(p.detach()) for p in self.fptt_parameters()]
        self._workspace = torch.empty(0, dtype=torch.float32)
    opt = self.optimizer
    fstate = opt.kernel_state(self.fptt_parameters(), self._grads, x.device)
    config = SegmentConfig(weight=weight, loss=LOSS_CODE[self.loss], per_step=self.per_step,
                           update=update, builtin_gemm=self.cpu_builtin_gemm)
    loss, h, c = ext.lstm_segment_step_cpu(fstate, SegmentIO(x, target, state[0], state[1]),
                                           config, self._workspace)
    if update:  # the binding recorded the step in status
        opt.report_skipped(int(fstate.status[STATUS_SKIPPED].item()))
    return torch.tensor(loss, dtype=torch.float32), (h, c)


class ListPathCpu(CpuBackend):
    """The cpu backend with its segment on the list path (lstm_list_path)."""

    def segment(self, m, x, target, state, weight, update):
        return lstm_list_path(m, x, target, state, weight, update)


def lstm_pair(sizes, loss, per_step, opt_kw, seed):
    I, H, O = sizes
    models = []
    for _ in range(2):  # the same seed: the same weights, and w_bar = w
        torch.manual_seed(seed)
        models.append(fptt_fast.FPTTLSTM(I, H, O, loss=loss, per_step=per_step, backend="cpu",
                                         **opt_kw))
    a, b = models
    assert_same(*[[p.detach() for p in m.fptt_parameters()] for m in (a, b)])
    b._engine = ListPathCpu()
    return a, b


def lstm_outputs(m):
    st = m.optimizer.state
    return ([p.detach().clone() for p in m.fptt_parameters()]
            + [st[p][f].clone() for p in m.fptt_parameters() for f in sorted(st[p])]
            + [m.optimizer._status.clone()] + [g.clone() for g in m._grads])


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for i, (u, v) in enumerate(zip(xs, ys)):
        assert torch.equal(u, v), f"output {i} differs"


def run_segments(models, sizes, loss, per_step, B, omegas, gen, weights=None):
    I, H, O = sizes
    states = [None] * len(models)
    for k, omega in enumerate(omegas):
        x = torch.randn(omega, B, I, generator=gen)
        y = (torch.randn(*((omega, B) if per_step else (B,)), O, generator=gen) if loss == "mse"
             else torch.randint(0, O, (omega, B) if per_step else (B,), generator=gen))
        w = 1.0 if weights is None else weights[k]
        outs = []
        for i, m in enumerate(models):
            l, states[i] = m.train_segment(x, y, states[i], weight=w)
            outs.append([l, *states[i]])
        for o in outs[1:]:
            assert_same(outs[0], o)
    return states


@pytest.mark.parametrize("loss,per_step,opt", [("mse", False, "adam"), ("ce", True, "sgd"),
                                                ("ce", False, "adamw"), ("mse", True, "adam")])
def test_lstm_plan_is_bitwise_the_list_path(loss, per_step, opt):
    sizes = (3, 5, 4)
    a, b = lstm_pair(sizes, loss, per_step, LSTM_OPT[opt], seed=20)
    gen = torch.Generator().manual_seed(21)
    run_segments([a, b], sizes, loss, per_step, 3, [2, 1, 4, 3] * 6, gen,
                 weights=[(k % 4 + 1) / 4 for k in range(24)])
    assert_same(lstm_outputs(a), lstm_outputs(b))
    assert {int(a.optimizer.state[p]["step"]) for p in a.fptt_parameters()} == {24}
    # the update=False path (loss_and_grads) too
    x = torch.randn(2, 3, sizes[0], generator=gen)
    y = make_target(loss, per_step, 2, 3, sizes[2])
    la, sa, ga = a.loss_and_grads(x, y, weight=0.7)
    lb, sb, gb = b.loss_and_grads(x, y, weight=0.7)
    assert_same([la, *sa, *ga.values()], [lb, *sb, *gb.values()])
    assert_same(lstm_outputs(a), lstm_outputs(b))


def test_lstm_hot_path_has_no_python_lists(monkeypatch):
    sizes = (2, 4, 1)
    a, b = lstm_pair(sizes, "mse", False, LSTM_OPT["adam"], seed=22)
    gen = torch.Generator().manual_seed(23)
    run_segments([a, b], sizes, "mse", False, 2, [3], gen)

    def forbidden(*args, **kw):
        raise AssertionError("a slow-path method ran on the hot path")

    for name in ("_hyper_table", "refresh_cpu_plan", "_record", "cpu_plan", "kernel_state",
                 "report_skipped"):
        monkeypatch.setattr(a.optimizer, name, forbidden)
    x, y = torch.randn(3, 2, 2, generator=gen), torch.randn(2, 1, generator=gen)
    cached = a._cpu_plan
    for _ in range(4):
        a.train_segment(x, y)
    assert a._cpu_plan is cached


def test_lstm_changes_between_segments_are_honoured():
    """An lr schedule on m.optimizer's groups, a clip change, m.optimizer.load_state_dict, a
    parameter's data replaced and load_lstm_state_dict (a new optimiser): bitwise the list
    path throughout."""
    sizes = (2, 4, 3)
    a, b = lstm_pair(sizes, "ce", False, LSTM_OPT["adam"], seed=24)
    gen = torch.Generator().manual_seed(25)
    run_segments([a, b], sizes, "ce", False, 4, [3, 3], gen)
    for _ in range(4):  # a step schedule, as StepLR(gamma=0.5) writes it
        run_segments([a, b], sizes, "ce", False, 4, [2], gen)
        for m in (a, b):
            m.optimizer.param_groups[0]["lr"] *= 0.5
    # the table holds the lr of the last segment
    assert a.optimizer._hyper[0, 0].item() == pytest.approx(LSTM_OPT["adam"]["lr"] * 0.5 ** 3)
    for m in (a, b):
        m.optimizer.clip = 0.01
    run_segments([a, b], sizes, "ce", False, 4, [2, 3], gen)
    assert_same(lstm_outputs(a), lstm_outputs(b))
    sd = copy.deepcopy(a.optimizer.state_dict())
    run_segments([a, b], sizes, "ce", False, 4, [2], gen)
    sd["param_groups"][0]["lr"] = 0.03
    for m in (a, b):
        m.optimizer.load_state_dict(copy.deepcopy(sd))
    run_segments([a, b], sizes, "ce", False, 4, [2, 2], gen)
    assert a.optimizer._hyper[0, 0].item() == pytest.approx(0.03)
    new = torch.randn(a.weight_hh_l0.shape, generator=gen)
    plan = a._cpu_plan
    for m in (a, b):
        m.weight_hh_l0.data = new.clone()
    run_segments([a, b], sizes, "ce", False, 4, [2, 1], gen)
    assert a._cpu_plan is not plan
    assert_same(lstm_outputs(a), lstm_outputs(b))
    sd = a.lstm_state_dict()
    for m in (a, b):
        m.load_lstm_state_dict(sd)
    run_segments([a, b], sizes, "ce", False, 4, [3, 2], gen)
    assert a._cpu_plan[0] is a.optimizer.cpu_plan()
    assert_same(lstm_outputs(a), lstm_outputs(b))


def test_lstm_bad_hyper_and_aliased_input_are_refused():
    sizes = (2, 3, 2)
    a, _ = lstm_pair(sizes, "mse", False, LSTM_OPT["sgd"], seed=26)
    gen = torch.Generator().manual_seed(27)
    x, y = torch.randn(2, 12, 2, generator=gen), torch.randn(12, 2, generator=gen)
    a.train_segment(x, y)
    a.optimizer.param_groups[0]["momentum"] = -0.5
    params = [p.detach().clone() for p in a.fptt_parameters()]
    with pytest.raises(ValueError, match="momentum"):
        a.train_segment(x, y)
    a.optimizer.param_groups[0]["momentum"] = 0.9
    # h0 is the weight_hh gradient buffer ([4H, H] = [B, H] with B = 12): written by the
    # call, so refused by the shared checks, with nothing changed
    grads = [g.clone() for g in a._grads]
    h0 = a._grads[1]
    with pytest.raises(RuntimeError, match="shares memory"):
        a.train_segment(x, y, (h0, torch.zeros(12, 3)))
    assert_same(params, [p.detach() for p in a.fptt_parameters()])
    assert_same(grads, a._grads)
    # x inside the optimiser's status (written with the update): refused the same way,
    # through the plan's step as through the list binding
    status = a.optimizer._status
    before = status.clone()
    with pytest.raises(RuntimeError, match="status"):
        a.train_segment(status[:2].view(1, 1, 2), y[:1])
    assert_same([before], [status])
    # inputs that only overlap each other are fine (all are read)
    h = torch.randn(12, 3, generator=gen)
    a.train_segment(x, y, (h, h))


def test_lstm_module_deepcopies():
    """A deep copy trains on as the original does, bitwise, and apart from it (it failed
    at its first segment when the copy of its FPTT kept only torch's three fields)."""
    a, _ = lstm_pair((2, 3, 1), "mse", False, LSTM_OPT["adam"], seed=28)
    gen = torch.Generator().manual_seed(29)
    a.train_segment(torch.randn(2, 2, 2, generator=gen), torch.randn(2, 1, generator=gen))
    c = copy.deepcopy(a)
    assert c._cpu_plan[3] is None and c._cpu_plan[0] is None
    assert_same(lstm_outputs(c), lstm_outputs(a))
    for _ in range(3):
        x, y = torch.randn(3, 2, 2, generator=gen), torch.randn(2, 1, generator=gen)
        la, _ = a.train_segment(x, y)
        lc, _ = c.train_segment(x, y)
        assert torch.equal(la, lc)
    assert_same(lstm_outputs(c), lstm_outputs(a))
    before = lstm_outputs(a)
    c.train_segment(x, y)
    assert_same(lstm_outputs(a), before)  # the copy shares nothing with the original


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_optimizer_copies_step_as_the_original(how):
    """copy.deepcopy / pickle of an FPTT (torch's Optimizer keeps only defaults, state and
    param_groups): the copy holds its own flat buffers and status, its state entries stay
    views of them, and it steps bitwise as the original from then on."""
    import pickle

    pa, pl, pb, oa, ol, ob = triple("adam")
    gen = torch.Generator().manual_seed(32)
    grads = lambda: [torch.randn(p.shape, generator=gen) for p in pa]  # noqa: E731
    step_all([(pa, oa)], grads())
    pc, oc = copy.deepcopy((pa, oa)) if how == "deepcopy" else pickle.loads(pickle.dumps((pa, oa)))
    flat = oc.flat_state["lam"]
    for p in pc:
        lam = oc.state[p]["lam"]
        assert lam.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    for _ in range(3):
        step_all([(pa, oa), (pc, oc)], grads())
        assert_bitwise_equal(pa, pc, oa, oc)
    assert oc.skipped_steps == oa.skipped_steps


def test_a_dropped_update_plan_is_retired():
    """FPTT retires the C++ plan it drops (here at load_state_dict): the plan's own checks,
    and the LSTM fast path built on it, then say it is stale, with no look at FPTT's
    private attributes; the next segment rebuilds and matches the list path."""
    sizes = (2, 3, 1)
    a, b = lstm_pair(sizes, "mse", False, LSTM_OPT["adam"], seed=30)
    gen = torch.Generator().manual_seed(31)
    run_segments([a, b], sizes, "mse", False, 3, [2, 2], gen)
    opt, ext = a.optimizer, backends.extension()
    old, fast = opt.cpu_plan(), a._cpu_fast
    x, y = torch.randn(2, 3, 2, generator=gen), torch.randn(3, 1, generator=gen)
    for m in (a, b):
        m.optimizer.load_state_dict(copy.deepcopy(m.optimizer.state_dict()))
    assert old.check(opt.param_groups, opt.clip) == ext.PLAN_STALE
    assert old.step(opt.param_groups, opt.clip) == ext.PLAN_STALE
    before = lstm_outputs(a)
    assert fast.train(x, y, None, 1.0) is None  # declined, having done nothing
    assert_same(lstm_outputs(a), before)
    for m in (a, b):
        m.train_segment(x, y)
    assert opt.cpu_plan() is not old and a._cpu_plan[0] is opt.cpu_plan()
    assert_same(lstm_outputs(a), lstm_outputs(b))


def test_plans_are_classes_of_the_extension():
    ext = backends.extension()
    assert (ext.PLAN_STALE, ext.PLAN_HYPER, ext.PLAN_FALLBACK) == (-1, -2, -3)
    assert FPTT.step.hooked is True  # torch's wrapper is applied by FPTT itself


# ---- train_segment's fast path (_C.CpuLstmPlan.train) -----------------------------------

def _no_python_checks(monkeypatch, m):
    def forbidden(*args, **kw):
        raise AssertionError("train_segment left its fast path")

    for name in ("_inputs", "_check_device"):
        monkeypatch.setattr(m, name, forbidden)
    monkeypatch.setattr(m._engine, "segment", forbidden)


@pytest.mark.parametrize("loss,per_step", [("mse", False), ("ce", True)])
def test_lstm_fast_path_is_one_call_and_bitwise_the_list_path(monkeypatch, loss, per_step):
    """After the first segment, train_segment is the plan's train() alone (no Python check,
    no backend segment call), with state None, a tuple or a list, int or float weights, changing B and
    omega: bitwise the list path throughout."""
    sizes = (3, 4, 2)
    a, b = lstm_pair(sizes, loss, per_step, LSTM_OPT["adam"], seed=40)
    gen = torch.Generator().manual_seed(41)
    # the largest segment first: a workspace growth is left to the checked step
    run_segments([a, b], sizes, loss, per_step, 5, [4], gen)
    assert a._cpu_fast is a._cpu_plan[3] and b._cpu_fast is None
    _no_python_checks(monkeypatch, a)
    states = [None, None]
    for k, (omega, B) in enumerate([(1, 3), (3, 3), (2, 5), (4, 1), (2, 5)]):
        x = torch.randn(omega, B, sizes[0], generator=gen)
        lead = (omega, B) if per_step else (B,)
        y = (torch.randn(*lead, sizes[2], generator=gen) if loss == "mse"
             else torch.randint(0, sizes[2], lead, generator=gen))
        w = [1, 0.25, 2, 0.5, 1.0][k]
        outs = []
        for i, m in enumerate((a, b)):
            st = states[i]
            if st is not None and st[0].shape[0] != B:
                st = None
            if st is not None and k % 2:
                st = list(st)
            l, states[i] = m.train_segment(x, y, st, weight=w)
            outs.append([l, *states[i]])
        assert_same(*outs)
        assert isinstance(states[0], tuple) and outs[0][0].dim() == 0
    monkeypatch.undo()
    assert_same(lstm_outputs(a), lstm_outputs(b))


def _bad_inputs(gen):
    """(name, x, target, state, weight, error, message) for FPTTLSTM(2, 3, 2) mse, B=4."""
    x, y = torch.randn(2, 4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    h = torch.randn(4, 3, generator=gen)

    def poisoned(t, v):
        t = t.clone()
        t.view(-1)[1] = v
        return t

    return [
        ("nan x", poisoned(x, float("nan")), y, None, 1.0, ValueError, "x holds NaN or inf"),
        ("inf target", x, poisoned(y, float("inf")), None, 1.0, ValueError, "target holds"),
        ("nan h", x, y, (poisoned(h, float("nan")), h), 1.0, ValueError, "state h holds"),
        ("inf c", x, y, (h, poisoned(h, -float("inf"))), 1.0, ValueError, "state c holds"),
        ("x shape", x[:, :, :1], y, None, 1.0, ValueError, "time-major"),
        ("x dtype", x.double(), y, None, 1.0, TypeError, "x must be float32"),
        ("x list", x.tolist(), y, None, 1.0, TypeError, "x must be a tensor"),
        ("target shape", x, y[:3], None, 1.0, ValueError, "mse target must have shape"),
        ("target dtype", x, y.double(), None, 1.0, TypeError, "mse target must be float32"),
        ("state shape", x, y, (h[:2], h[:2]), 1.0, ValueError, "state h must have shape"),
        ("state arity", x, y, (h,), 1.0, ValueError, "state must be a pair"),
        ("state dtype", x, y, (h, h.double()), 1.0, TypeError, "state c must be float32"),
        ("weight nan", x, y, None, float("nan"), ValueError, "weight must be finite"),
        ("weight negative", x, y, None, -1.0, ValueError, "weight must be finite and >= 0"),
        ("weight str", x, y, None, "1", None, None),  # float("1") works: taken by Python
        ("weight text", x, y, None, "one", ValueError, "weight must be a number"),
    ]


def test_lstm_fast_path_refuses_as_the_python_checks_do():
    """Every bad input reaches the same exception type and message as a module that never
    took the fast path, and changes nothing; the fast path is still taken afterwards."""
    gen = torch.Generator().manual_seed(42)
    a, b = lstm_pair((2, 3, 2), "mse", False, LSTM_OPT["sgd"], seed=43)
    b._engine = backends.engine("cpu")  # b: the plan, but never the fast path
    run_segments([a, b], (2, 3, 2), "mse", False, 4, [2], gen)
    b._cpu_fast = None
    b.__dict__["_cpu_plan"] = None
    for name, x, y, st, w, err, msg in _bad_inputs(gen):
        snap = lstm_outputs(a)
        results = []
        for m in (a, b):
            if m is b:
                m.__dict__["_cpu_fast"] = None  # b takes Python's checks every time
            if err is None:
                results.append(m.train_segment(x, y, st, weight=w))
                continue
            with pytest.raises(err) as info:
                m.train_segment(x, y, st, weight=w)
            results.append((type(info.value), str(info.value)))
        if err is None:
            assert_same([results[0][0], *results[0][1]], [results[1][0], *results[1][1]])
            continue
        assert results[0] == results[1], name
        assert msg in results[0][1], name
        assert_same(snap, lstm_outputs(a))
    assert a._cpu_fast is not None
    x, y = torch.randn(2, 4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    assert_same(list(a.train_segment(x, y))[:1], list(b.train_segment(x, y))[:1])


def test_lstm_fast_path_ce_classes_and_input_conversions():
    """ce: out-of-range classes raise ValueError (check_inputs) or the kernel's RuntimeError
    (without), as before; int32 targets and non-contiguous x take Python's conversions."""
    gen = torch.Generator().manual_seed(44)
    for check in (True, False):
        torch.manual_seed(45)
        m = fptt_fast.FPTTLSTM(2, 3, 3, loss="ce", backend="cpu", check_inputs=check)
        x, y = torch.randn(2, 4, 2, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        m.train_segment(x, y)
        assert m._cpu_fast is not None
        bad = y.clone()
        bad[2] = 3
        with pytest.raises(ValueError if check else RuntimeError, match="class"):
            m.train_segment(x, bad)
        torch.manual_seed(45)
        ref = fptt_fast.FPTTLSTM(2, 3, 3, loss="ce", backend="cpu", check_inputs=check)
        ref.train_segment(x, y)
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
        assert not xt.is_contiguous()
        for mm, xx, yy in ((m, xt, y.int()), (ref, x, y)):
            ref.__dict__["_cpu_fast"] = None  # ref: always Python's checks
            l, _ = mm.train_segment(xx, yy)
        assert_same([p.detach() for p in m.fptt_parameters()],
                     [p.detach() for p in ref.fptt_parameters()])


def test_lstm_fast_path_follows_attribute_changes():
    """check_inputs=False (assigned) is honoured: a NaN input then reaches the update, whose
    non-finite gradient the optimiser reports (FloatingPointError), nothing changed; a new
    optimiser (assigned) is the one that steps."""
    gen = torch.Generator().manual_seed(46)
    torch.manual_seed(47)
    m = fptt_fast.FPTTLSTM(2, 3, 1, backend="cpu")
    x, y = torch.randn(2, 4, 2, generator=gen), torch.randn(4, 1, generator=gen)
    m.train_segment(x, y)
    m.train_segment(x, y)
    assert m._cpu_fast is not None
    m.check_inputs = False
    assert m._cpu_fast is None
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    params = [p.detach().clone() for p in m.fptt_parameters()]
    with pytest.raises(FloatingPointError):
        m.train_segment(bad, y)
    assert_same(params, [p.detach() for p in m.fptt_parameters()])
    m.train_segment(x, y)
    m.train_segment(x, y)
    assert m._cpu_fast is not None
    old = m.optimizer
    m.optimizer = fptt_fast.FPTT(m.fptt_parameters(), lr=0.1, backend="cpu")
    old_steps = [old.state[p]["step"].item() for p in m.fptt_parameters()]
    m.train_segment(x, y)
    m.train_segment(x, y)
    assert [old.state[p]["step"].item() for p in m.fptt_parameters()] == old_steps
    assert {m.optimizer.state[p]["step"].item() for p in m.fptt_parameters()} == {2.0}
