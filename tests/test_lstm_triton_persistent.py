"""The weight-stationary persistent Triton LSTM kernel (kernels/lstm_persistent.py,
FPTTLSTM(backend="triton") with m.triton_kernel = "persistent") against the reference backend.

Where there is no GPU the kernel runs in Triton's interpreter on CPU tensors (one program
holding every hidden unit: the interpreter runs programs one after another, so it cannot
run the spinning group syncs); with a GPU the same tests run compiled on CUDA tensors
(tests/utils.py: backend_device), with larger batches (several groups of NP programs).
What the interpreter cannot run, the NP > 1 rank slicing and the group barriers, is
compiled ahead of time for sm_90 here (no GPU needed) and run by the GPU-only tests.

Each comparison poisons the outputs first (gradients, fresh allocations and the kernel's
cached workspace are NaN before the call), draws fresh random inputs, and checks, after
every update (20+ per case), the loss, the carried (h, c), the task gradients, the
parameters and every FPTT state field, the step counts and the update's norm, within
tests/utils.py's tolerances (1e-4 of max |w| through matmuls, h within 1e-5).
"""
import random

import pytest
import torch

import fptt_fast
from fptt_fast.kernels import lstm_persistent as lp
from fptt_fast.optim import STATUS_LAST_SKIPPED

from .utils import (finish_background_compile, start_background_compile, LSTM_OPT, NAN, TOL_MATMUL, LSTMPair, assert_all_equal,
                    assert_unchanged, backend_device, bind_args, with_fields, fptt_weights, interpreted,
                    assert_tf32_close, poisoned_allocations, scaled_err, segment_grads, sm90_compile_script,
                    snapshot, triton_compiled)

gpu = pytest.mark.skipif(not triton_compiled(),
                         reason="needs a CUDA GPU (without one Triton runs in its interpreter)")


def _dev():
    return backend_device("triton", "lstm")


def _poison_workspaces():
    """NaN in every float buffer of the kernel's cached workspaces: a value the kernel
    reads without having written it in this launch shows up."""
    for ws in lp._WORKSPACES.values():
        for v in ws.values():
            if v.is_floating_point():
                v.fill_(NAN)


def _pair(I, H, O, loss, per_step, dev, opt, clip, **kw):
    """LSTMPair whose fused side runs the persistent kernel (the pair hands its keyword
    arguments to FPTT too, so the kernel is chosen on the module afterwards)."""
    opt_kw = {**LSTM_OPT[opt], "clip": clip, **kw}
    pair = LSTMPair("triton", I, H, O, loss=loss, per_step=per_step, device=dev, **opt_kw)
    pair.m.triton_kernel = "persistent"
    return pair


# I, H, O, loss, per_step, optimizer, clip, B (interpreter; on a GPU B is larger)
CASES = [
    (1, 1, 1, "mse", False, "sgd", 0.5, 3),        # H = I = O = 1
    (3, 13, 4, "ce", True, "adam", 1.0, 5),        # a middle H, per-step CE
    (2, 20, 3, "mse", True, "adamw", None, 70),    # no clip; two batch tiles (interpreter)
    # H not a power of two, terminal CE, one row (with O = 2 and two rows the bias
    # gradient, a sum of +-p terms, can cancel to ~1e-4 of its terms: rounding then
    # exceeds 1e-4 of its own size)
    (5, 37, 2, "ce", False, "sgd", None, 1),
    (32, 128, 32, "mse", False, "adam", 1.0, 3),   # the limits H = 128, I = O = 32
]
IDS = [f"H{c[1]}-{c[3]}{'-step' if c[4] else ''}-{c[5]}-clip{c[6]}" for c in CASES]


def _batch(B, dev):
    return B if interpreted("triton") else B * 9 + 5  # on a GPU: several groups


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_segments_match_reference(case, fresh_seed):
    """20 train_segment calls (one launch each) of random lengths 1..4 (1..2 for H >= 64),
    (h, c) carried,
    everything compared with the reference after each; last_kernel says 'persistent'."""
    I, H, O, loss, per_step, opt, clip, B = case
    dev = _dev()
    pair = _pair(I, H, O, loss, per_step, dev, opt, clip, fptt_state=0.1)
    fused = pair.fused

    def poisoned(*a, **k):
        _poison_workspaces()
        return fused(*a, **k)

    pair.fused = poisoned
    rng = random.Random(fresh_seed)
    n = 20
    longest = 4 if H < 64 else 2  # the interpreter's time grows with H * omega
    pair.run(_batch(B, dev), [rng.randint(1, longest) for _ in range(n)],
             weights=fptt_weights(n, per_step), state_scale=0.5, state_tol=TOL_MATMUL)
    assert pair.m.last_kernel == "persistent"


# T, K: several segments with a shorter last one, and per-time-step FPTT (K = T); K = 1
# is train_segment (test_segments_match_reference)
SEQUENCES = [(7, 3), (5, 5)]


def _sequence_vs_reference(pair, B, T, K, dev, n_batches):
    """n_batches of train_sequence(x, y, K) (ONE launch each) against the reference
    driven segment by segment; returns the number of updates."""
    m = pair.m
    bounds = [(p * -(-T // K), min(T, (p + 1) * -(-T // K))) for p in range(K)]
    for _ in range(n_batches):
        x = torch.randn(T, B, pair.I, device=dev)
        y = (torch.randn(*((T, B) if pair.per_step else (B,)), pair.O, device=dev)
             if pair.loss == "mse" else
             torch.randint(0, pair.O, (T, B) if pair.per_step else (B,), device=dev))
        want, state = [], None
        for p, (a, b) in enumerate(bounds):
            w = 1.0 if pair.per_step else (p + 1) / K
            loss, state, grads_ref = pair.ref(x[a:b], y[a:b] if pair.per_step else y, state, w)
            want.append(loss)
        if segment_grads(m) is not None:
            for g in segment_grads(m):
                g.fill_(NAN)
        _poison_workspaces()
        with poisoned_allocations():
            got = m.train_sequence(x, y, K)
        assert m.last_kernel == "persistent"
        want = torch.stack(want)
        assert got.shape == (K,) and torch.isfinite(got).all()
        assert (got - want).abs().max().item() <= TOL_MATMUL * max(1.0, want.abs().max().item())
        # the gradients left are those of the last segment
        for g_f, g_r in zip(segment_grads(m), grads_ref):
            assert scaled_err(g_f, g_r, max(g_r.abs().max().item(), 1e-6)) <= TOL_MATMUL
        pair.compare_params()
        n_f, n_r = m.optimizer.last_norm.item(), pair.opt.last_norm.item()
        assert abs(n_f - n_r) <= TOL_MATMUL * n_r
        assert m.optimizer._status[STATUS_LAST_SKIPPED].item() == 0.0
    return n_batches * K


@pytest.mark.parametrize("T,K", SEQUENCES, ids=[f"T{t}-K{k}" for t, k in SEQUENCES])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]], ids=[IDS[1], IDS[2], IDS[3]])
def test_train_sequence_matches_reference(case, T, K, fresh_seed):
    """train_sequence: the K segments (forward, loss, backward, gradients, clip, update,
    next segment from the carried state) in one launch, 20+ updates in all."""
    I, H, O, loss, per_step, opt, clip, B = case
    dev = _dev()
    pair = _pair(I, H, O, loss, per_step, dev, opt, clip, fptt_state=0.1)
    n = _sequence_vs_reference(pair, _batch(B, dev), T, K, dev, -(-20 // K))
    assert n >= 20
    steps = {int(pair.m.optimizer.state[p]["step"]) for p in pair.m.fptt_parameters()}
    assert steps == {n}


def test_final_state_of_one_launch(fresh_seed):
    """The (h, c) the K-segment launch leaves (train_sequence drops it; _launch is the
    call it makes) is the reference's after the K segments."""
    dev = _dev()
    I, H, O, B, T, K = 3, 9, 2, 4, 6, 3
    pair = _pair(I, H, O, "mse", True, dev, "adam", 1.0)
    x, y = torch.randn(T, B, I, device=dev), torch.randn(T, B, O, device=dev)
    h0, c0 = torch.randn(B, H, device=dev) * 0.5, torch.randn(B, H, device=dev) * 0.5
    _poison_workspaces()
    with poisoned_allocations():
        losses, (h, c) = pair.m._launch(x, y, (h0, c0), 1.0, n_segs=K, ramp=False)
    state = (h0, c0)
    for p in range(K):
        _, state, _ = pair.ref(x[2 * p:2 * p + 2], y[2 * p:2 * p + 2], state, 1.0)
    assert scaled_err(h, state[0], 1.0) <= TOL_MATMUL
    assert scaled_err(c, state[1], max(1.0, state[1].abs().max().item())) <= TOL_MATMUL
    pair.compare_params()


def persistent(*args, **kw):
    """FPTTLSTM(backend="triton") running kernels/lstm_persistent.py: the experimental
    switch is the module's triton_kernel attribute, not a constructor argument."""
    m = fptt_fast.FPTTLSTM(*args, backend="triton", **kw)
    m.triton_kernel = "persistent"
    return m


def _bits(seed, dev, sizes, loss, per_step, K, opt_kw, calls=2):
    """Everything a few train_sequence calls and a train_segment produce."""
    I, H, O, B, T = sizes
    torch.manual_seed(seed)
    m = persistent(I, H, O, loss=loss, per_step=per_step, device=dev, **opt_kw)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    lead = (T, B) if per_step else (B,)
    outs = []
    for _ in range(calls):
        x = torch.randn(T, B, I, device=dev, generator=gen)
        y = (torch.randn(*lead, O, device=dev, generator=gen) if loss == "mse"
             else torch.randint(0, O, lead, device=dev, generator=gen))
        outs += [m.train_sequence(x, y, K).clone(), *[g.clone() for g in segment_grads(m)]]
    loss_k, state = m.train_segment(x[:2], y[:2] if per_step else y, None, weight=0.5)
    outs += [loss_k.clone(), *state]
    st = m.optimizer.state
    return (outs + [p.detach().clone() for p in m.fptt_parameters()]
            + [st[p][f].clone() for p in m.fptt_parameters() for f in sorted(st[p])]
            + [m.optimizer._status.clone()])


@pytest.mark.parametrize("loss,per_step,K", [("ce", True, 5), ("mse", False, 2)])
def test_bitwise_deterministic(loss, per_step, K, fresh_seed):
    dev = _dev()
    sizes = (3, 10, 3, 5 if interpreted("triton") else 77, 5)  # I, H, O, B, T
    kw = dict(optimizer="adam", lr=1e-2, weight_decay=0.01, clip=1.0)
    assert_all_equal(_bits(fresh_seed, dev, sizes, loss, per_step, K, kw),
                     _bits(fresh_seed, dev, sizes, loss, per_step, K, kw))


@pytest.mark.parametrize("loss,per_step", [("mse", False), ("ce", True)])
def test_train_sequence_equals_k_train_segment_calls(loss, per_step, fresh_seed):
    """One launch of K segments and K launches of one segment (the state carried by the
    host) run the same per-segment code: bitwise the same results."""
    dev = _dev()
    I, H, O, B, T, K = 2, 11, 3, (4 if interpreted("triton") else 50), 7, 3
    kw = dict(loss=loss, per_step=per_step, device=dev, optimizer="sgd", lr=0.05, momentum=0.9,
              clip=0.5)
    torch.manual_seed(fresh_seed)
    one = persistent(I, H, O, **kw)
    many = persistent(I, H, O, **kw)
    many.load_lstm_state_dict(one.lstm_state_dict())
    x = torch.randn(T, B, I, device=dev)
    y = (torch.randn(*((T, B) if per_step else (B,)), O, device=dev) if loss == "mse"
         else torch.randint(0, O, (T, B) if per_step else (B,), device=dev))
    got = one.train_sequence(x, y, K)
    want, state = [], None
    for p, (a, b) in enumerate([(0, 3), (3, 6), (6, 7)]):
        l, state = many.train_segment(x[a:b], y[a:b] if per_step else y, state,
                                      weight=1.0 if per_step else (p + 1) / K)
        want.append(l)
    assert many.last_kernel == one.last_kernel == "persistent"
    assert torch.equal(got, torch.stack(want))
    assert_all_equal(segment_grads(one), segment_grads(many))
    for p, q in zip(one.fptt_parameters(), many.fptt_parameters()):
        assert torch.equal(p, q)
        for f in one.optimizer.state[p]:
            assert torch.equal(one.optimizer.state[p][f], many.optimizer.state[q][f]), f


def test_nonfinite_input_skips_the_update(fresh_seed):
    """A NaN in one segment of a K-segment launch: that update is skipped and counted
    (nonfinite='skip'), the others train."""
    dev = _dev()
    m = persistent(3, 5, 2, device=dev, check_inputs=False, nonfinite="skip", clip=1.0)
    x, y = torch.randn(6, 2, 3, device=dev), torch.randn(2, 2, device=dev)
    m.train_sequence(x, y, 3)
    params, opt = m.fptt_parameters(), m.optimizer
    assert opt.skipped_steps == 0
    snap = snapshot(params, opt)
    bad = x.clone()
    bad[5, 0, 1] = NAN  # the last segment's input
    losses = m.train_sequence(bad, y, 3)
    assert torch.isfinite(losses[:2]).all() and torch.isnan(losses[2])
    assert opt.skipped_steps == 1 and opt._status[STATUS_LAST_SKIPPED].item() == 1.0
    assert int(opt.state[params[0]]["step"]) == 5  # 3 + 2 updates
    snap2 = snapshot(params, opt)
    m.train_segment(bad[4:], y)  # a segment holding a NaN changes nothing at all
    assert_unchanged(params, opt, snap2)
    assert not all(torch.equal(p.detach(), w) for p, w in zip(params, snap[0]))


def test_out_of_range_class_skips_the_update(fresh_seed):
    dev = _dev()
    m = persistent(2, 8, 3, loss="ce", device=dev, check_inputs=False, nonfinite="skip")
    before = [p.detach().clone() for p in m.fptt_parameters()]
    m.train_segment(torch.randn(4, 2, 2, device=dev), torch.tensor([0, 7], device=dev))
    assert m.optimizer.skipped_steps == 1
    for p, q in zip(m.fptt_parameters(), before):
        assert torch.equal(p.detach(), q)


def test_kernel_choice_and_limits():
    """The persistent kernel is chosen on the module (m.triton_kernel, not a constructor
    argument until it is measured on a GPU): the general kernel by default, a clear
    ValueError for an unknown choice or beyond the persistent kernel's limits, at the
    first call and having changed nothing."""
    dev = _dev()
    with pytest.raises(TypeError, match="triton_kernel"):
        fptt_fast.FPTTLSTM(2, 4, 1, backend="triton", device=dev, triton_kernel="persistent")
    m = fptt_fast.FPTTLSTM(2, 4, 1, backend="triton", device=dev)
    assert m.triton_kernel == "general" and m.last_kernel is None
    m.train_segment(torch.randn(3, 2, 2, device=dev), torch.randn(2, 1, device=dev))
    assert m.last_kernel == "general"
    for (I, H, O), limit in (((2, lp.MAX_HIDDEN + 1, 1), "MAX_HIDDEN"),
                             ((lp.MAX_INPUT + 1, 8, 1), "MAX_INPUT"),
                             ((2, 8, lp.MAX_OUTPUT + 1), "MAX_OUTPUT"),
                             ((2, 4, 1), "triton_kernel must be one of")):
        m = fptt_fast.FPTTLSTM(I, H, O, backend="triton", device=dev)  # the general one takes it
        m.triton_kernel = "persistent" if limit != "triton_kernel must be one of" else "fast"
        before = m.lstm_state_dict()
        with pytest.raises(ValueError, match=limit):
            m.train_sequence(torch.randn(2, 1, I, device=dev), torch.randn(1, O, device=dev), 2)
        for k, v in m.lstm_state_dict().items():
            assert torch.equal(v, before[k])


def test_train_rejects_bad_arguments(fresh_seed, monkeypatch):
    dev = _dev()
    m = persistent(3, 4, 2, device=dev)
    seen = {}
    orig = lp.train

    def spy(*a, **k):
        seen.update(bind_args(orig, a, k))
        return orig(*a, **k)

    x, y = torch.randn(4, 2, 3, device=dev), torch.randn(2, 2, device=dev)
    with monkeypatch.context() as mp:
        mp.setattr(lp, "train", spy)
        m.train_sequence(x, y, 2)
    assert seen["config"].n_segs == 2 and seen["config"].ramp is True

    def call(**changed):
        lp.train(**with_fields(seen, **changed))

    with pytest.raises(ValueError, match="target"):
        call(target=y[:, :1])
    with pytest.raises(ValueError, match="h0"):
        call(h0=seen["segment"].h0[:1])
    with pytest.raises(ValueError, match="losses"):
        call(losses=seen["segment"].losses[:1])
    with pytest.raises(ValueError, match="K=3 segments"):
        call(x=torch.randn(4, 2, 3, device=dev), n_segs=3)  # ceil(4/2) = 2 segments, not 3
    monkeypatch.setattr(lp, "MAX_HIDDEN", 3)
    with pytest.raises(ValueError, match="MAX_HIDDEN=3"):
        call()


# ---------------------------------------------------------------------------------
# The GPU path: compiled ahead of time here; run on a GPU only.
# ---------------------------------------------------------------------------------

_AOT = sm90_compile_script(
    "lstm_persistent", "_lstm_persistent_kernel",
    consts='dict(LOSS=1, PER_STEP=True, OPT=1, NP=2, BB=mod._GPU_CONFIG[0], '
           'HS=mod._GPU_CONFIG[1], HP=32, IP=16, OP=16, PREC="ieee", RBLOCK=mod._RBLOCK, '
           'CHUNK=4096, BLOCK=1024, PBLOCK=1024)',
    ptr_kinds={"tab_ptr": "*i64", "chunk_ptr": "*i64", "bar_ptr": "*i32", "gbar_ptr": "*i32",
               "tgt_ptr": "*i64"},
    scalar_kinds={"clip": "fp32", "weight": "fp32", "ramp": "i1"}, num_warps="mod._GPU_CONFIG[2]")


_SM90 = {}


def start_sm90_compile():
    """Start the compile above in a subprocess, once (tests/conftest.py calls this as soon
    as the tests are chosen, so that it overlaps the interpreter tests)."""
    return start_background_compile(_SM90, _AOT, "fptt_persist_sm90_")


def test_gpu_path_compiles_for_sm90():
    """The GPU code (groups of NP = 2 programs, their spinning group barrier, the grid
    barriers, tl.dot tiles >= 16) compiled for sm_90 without a GPU: what the
    interpreter, which runs one program, does not build."""
    stdout = finish_background_compile(start_sm90_compile())
    assert int(stdout.split("CUBIN")[1].split()[0]) > 0


@gpu
@pytest.mark.parametrize("loss,per_step,K", [("ce", True, 5), ("mse", False, 2)])
def test_gpu_bitwise_independent_of_grid(loss, per_step, K, fresh_seed, monkeypatch):
    """Gradients are summed per batch tile, then over the tiles in tile order: the same
    bits whatever the number of groups (grid_limit: one group of NP programs, or two)."""
    dev = _dev()
    sizes = (3, 100, 3, 77, 5)  # NP = 8 programs per group, 5 batch tiles
    kw = dict(optimizer="adam", lr=1e-2, clip=1.0)
    full = _bits(fresh_seed, dev, sizes, loss, per_step, K, kw)
    for groups in (1, 2):
        with monkeypatch.context() as mp:
            orig = lp.train
            mp.setattr(lp, "train", lambda *a, **k: orig(*a, **k, grid_limit=8 * groups))
            assert_all_equal(full, _bits(fresh_seed, dev, sizes, loss, per_step, K, kw))
    assert all(int(ws["barrier"][0]) == 0 for ws in lp._WORKSPACES.values())


@gpu
def test_gpu_tf32_close(fresh_seed):
    """allow_tf32: the kernel's matmuls in TF32, close to the IEEE fp32 run."""
    dev = _dev()
    args = (fresh_seed, dev, (8, 128, 4, 32, 6), "mse", False, 2)
    kw = dict(optimizer="sgd", lr=0.05, clip=1.0)
    # 2 calls of (losses, six gradients), then train_segment's loss, h, c
    assert_tf32_close(_bits(*args, kw), _bits(*args, {**kw, "allow_tf32": True}),
                      n_run=2 * 7 + 3)
