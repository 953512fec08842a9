"""What only the one-launch Triton segment kernel (kernels/lstm_segment.py) has: its
cached workspaces, its in-place state update, its own argument checks and limits, its
sm_90 build, and on a GPU its grid (capped by grid_limit), grid barriers and TF32 mode.
Its match with the reference (every case, segment after segment, outputs poisoned) is
tested with every backend in test_lstm.py, on CUDA tensors where there is a GPU and
through the interpreter otherwise.
"""

import pytest
import torch

import fptt_fast
from fptt_fast.seam import FpttState, SegmentConfig, SegmentIO
from fptt_fast.kernels import lstm_segment as ls

from .utils import (finish_background_compile, start_background_compile, LSTM_KERNEL_KW, LSTMPair, assert_tf32_close, assert_all_equal, backend_device,
                    bind_args, with_fields, lstm_run_bits, segment_grads, sm90_compile_script, triton_compiled,
                    with_grid_limit)

gpu = pytest.mark.skipif(not triton_compiled(),
                         reason="needs a CUDA GPU (without one Triton runs in its interpreter)")


def _module(I, H, O, dev, **kw):
    return fptt_fast.FPTTLSTM(I, H, O, backend="triton", device=dev, optimizer="sgd", clip=1.0,
                              **kw)


def _launch_args(monkeypatch, m, x, y, state):
    """Train one segment of m; returns the arguments m passed to ls.train_segment, by
    name (so that a test can change one of them, whatever their order)."""
    seen = {}
    orig = ls.train_segment

    def spy(*a, **k):
        seen.update(bind_args(orig, a, k))
        return orig(*a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(ls, "train_segment", spy)
        m.train_segment(x, y, state)
    return seen


def test_workspace_cached_and_inputs_untouched(fresh_seed):
    T, B, I, H, O = 2, 2, 3, 4, 2
    dev = backend_device("triton", "lstm")
    m = fptt_fast.FPTTLSTM(I, H, O, per_step=True, backend="triton", device=dev, optimizer="sgd")
    x, y = torch.randn(T, B, I, device=dev), torch.randn(T, B, O, device=dev)
    h, c = torch.randn(B, H, device=dev), torch.randn(B, H, device=dev)
    copies = [t.clone() for t in (x, y, h, c)]
    m.train_segment(x, y, (h, c))
    n_ws = len(ls._WORKSPACES)
    ws = next(reversed(ls._WORKSPACES.values()))
    m.train_segment(x, y, (h, c))
    assert len(ls._WORKSPACES) == n_ws and next(reversed(ls._WORKSPACES.values())) is ws
    for a, b in zip((x, y, h, c), copies):
        assert torch.equal(a, b)


def test_state_updated_in_place(fresh_seed, monkeypatch):
    """h_out, c_out may be h0, c0 themselves (the carried state updated in place)."""
    T, B, I, H, O = 3, 70, 2, 5, 2  # two batch tiles in the interpreter's one program
    dev = backend_device("triton", "lstm")
    x, y = torch.randn(T, B, I, device=dev), torch.randn(B, O, device=dev)
    h, c = torch.randn(B, H, device=dev), torch.randn(B, H, device=dev)
    orig = ls.train_segment

    def in_place(*a, **k):
        args = bind_args(orig, a, k)
        io = args["segment"]
        return orig(**with_fields(args, h_out=io.h0, c_out=io.c0))

    outs = []
    for aliased in (False, True):
        torch.manual_seed(fresh_seed)
        m = _module(I, H, O, dev)
        hi, ci = h.clone(), c.clone()
        with monkeypatch.context() as mp:
            if aliased:
                mp.setattr(ls, "train_segment", in_place)
            loss, state = m.train_segment(x, y, (hi, ci))
        if aliased:  # the kernel wrote the new state over the one it started from
            assert not torch.equal(hi, h)
            state = (hi, ci)
        outs.append([*state, loss, *segment_grads(m), *m.fptt_parameters()])
    assert_all_equal(outs[0], outs[1])


def test_rejects_bad_inputs(fresh_seed, monkeypatch):
    T, B, I, H, O = 2, 2, 3, 4, 2
    dev = backend_device("triton", "lstm")
    m = _module(I, H, O, dev)
    x, y = torch.randn(T, B, I, device=dev), torch.randn(B, O, device=dev)
    args = _launch_args(monkeypatch, m, x, y, (torch.randn(B, H, device=dev),
                                               torch.randn(B, H, device=dev)))

    def call(**changed):
        ls.train_segment(**with_fields(args, **changed))

    with pytest.raises(ValueError, match="target"):
        call(target=y[:, :1])
    with pytest.raises(ValueError, match="target"):
        call(loss=ls.LOSS_CE)  # float targets for ce
    with pytest.raises(ValueError, match="h0"):
        call(h0=args["segment"].h0[:1])
    with pytest.raises(ValueError, match="x"):
        call(x=x.transpose(0, 1))
    monkeypatch.setattr(ls, "MAX_HIDDEN", 3)
    with pytest.raises(ValueError, match="MAX_HIDDEN=3"):
        call()


_AOT = sm90_compile_script(
    "lstm_segment", "_lstm_segment_kernel",
    consts='dict(LOSS=1, PER_STEP=True, OPT=1, BB=16, BH=32, BK=32, BR=32, BC=32, OP=16, '
           'PREC="ieee", CHUNK=4096, BLOCK=1024, PBLOCK=1024, UPDATE=True, HEAD=True, '
           'FWD_ONLY=False, DX=True, HSEQ=True)',
    ptr_kinds={"tab_ptr": "*i64", "chunk_ptr": "*i64", "bar_ptr": "*i32", "tgt_ptr": "*i64"},
    scalar_kinds={"clip": "fp32", "dscale": "fp32", "lscale": "fp32"}, num_warps="4")


_SM90 = {}


def start_sm90_compile():
    """Start the compile above in a subprocess, once (tests/conftest.py calls this as soon
    as the tests are chosen, so that it overlaps the interpreter tests)."""
    return start_background_compile(_SM90, _AOT, "fptt_sm90_")


def test_gpu_path_compiles_for_sm90():
    """The GPU code path (grid barriers, tl.dot tiles >= 16) compiled ahead of time for
    sm_90, no GPU needed: catches what the interpreter does not check."""
    stdout = finish_background_compile(start_sm90_compile())
    shared = int(stdout.split("SHARED")[1].split()[0])
    assert 0 < shared <= 48 * 1024, shared  # two blocks per SM on any sm_70+ GPU
    assert int(stdout.split("CUBIN")[1].split()[0]) > 0


# ---------------------------------------------------------------------------------
# GPU only: the multi-program grid, its three grid barriers, grid-independence, TF32.
# ---------------------------------------------------------------------------------

GPU_CASES = [
    (8, 64, 7, 100, 3, "mse", False),
    (5, 33, 16, 512, 10, "ce", True),
    (1, 1, 3, 37, 1, "mse", False),
]


@gpu
@pytest.mark.parametrize("T,B,I,H,O,loss,per_step", GPU_CASES)
def test_gpu_matches_reference(fresh_seed, T, B, I, H, O, loss, per_step):
    pair = LSTMPair("triton", I, H, O, loss=loss, per_step=per_step, device="cuda",
                    optimizer="adam", clip=1.0, **LSTM_KERNEL_KW)
    pair.run(B, [T] * 3, weights=[0.5, 1.0, 2.0], state_scale=0.5)
    ws = next(reversed(ls._WORKSPACES.values()))
    assert ws["barrier"][0].item() == 0  # nobody left waiting


def _bits(seed, T, B, I, H, O, loss, per_step, opt_kw=None, **kw):
    return lstm_run_bits("triton", "cuda", seed, (I, H, O, B, T),
                         opt_kw or dict(optimizer="adam", weight_decay=0.01, clip=1.0), 2, loss,
                         per_step, **kw)


@gpu
@pytest.mark.parametrize("T,B,I,H,O,loss,per_step", GPU_CASES[:2])
def test_gpu_bitwise_independent_of_grid_and_run(fresh_seed, monkeypatch, T, B, I, H, O, loss,
                                                 per_step):
    args = (fresh_seed, T, B, I, H, O, loss, per_step)
    full = _bits(*args)
    assert_all_equal(full, _bits(*args))
    for limit in (1, 3):
        with monkeypatch.context() as mp:
            with_grid_limit(mp, ls, "train_segment", limit)
            assert_all_equal(full, _bits(*args))


@gpu
def test_gpu_tf32_close(fresh_seed):
    """allow_tf32: the kernel's matmuls in TF32, close to the IEEE fp32 run (SGD: see
    assert_tf32_close; 2 segments of loss, h, c and six gradients)."""
    args = (fresh_seed, 6, 32, 8, 128, 4, "mse", False, dict(optimizer="sgd", lr=0.05, clip=1.0))
    assert_tf32_close(_bits(*args), _bits(*args, allow_tf32=True), n_run=2 * 9)


def test_hidden_limit():
    """The real limit, MAX_HIDDEN (checked before anything else is looked at)."""
    H = ls.MAX_HIDDEN + 1
    params = [torch.empty(s) for s in [(4 * H, 1), (4 * H, H), (4 * H,), (4 * H,), (1, H), (1,)]]
    with pytest.raises(ValueError, match=f"MAX_HIDDEN={ls.MAX_HIDDEN}"):
        ls.train_segment(FpttState(params, params, [], [], [], [], [], None, [], 1),
                         SegmentIO(torch.zeros(1, 1, 1), torch.zeros(1, 1), None, None,
                                   losses=torch.zeros(1)), SegmentConfig())


def test_co_resident_cap_takes_the_tightest_sm_limit(monkeypatch):
    """lstm_segment.co_resident_cap (used by both Triton LSTM kernels, whose programs wait
    on each other) on stand-ins for the compiled kernel and the device: blocks per SM are
    the least of fptt_update's cap, registers, shared memory and threads, times the SMs;
    cached per key; and a kernel that fits no SM is refused naming it."""
    import types
    fu = ls.fu
    props = types.SimpleNamespace(regs_per_multiprocessor=65536,
                                  shared_memory_per_multiprocessor=228 * 1024,
                                  max_threads_per_multi_processor=2048)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: props)
    monkeypatch.setattr(fu, "_sm_count", lambda dev: 132)
    compiled = []

    def kernel(n_regs, shared):
        def warmup(*args, grid, **kw):
            compiled.append(grid)
            return types.SimpleNamespace(n_regs=n_regs, metadata=types.SimpleNamespace(shared=shared))
        return types.SimpleNamespace(warmup=warmup)

    dev = torch.device("cuda", 0)
    kw = dict(num_warps=8)
    # 255 registers x 256 threads = 65280 of 65536 per SM: one block
    assert ls.co_resident_cap(kernel(255, 0), {}, dev, (1,), (), kw, "k") == 132
    # 64 registers: fptt_update's cap decides
    assert ls.co_resident_cap(kernel(64, 0), {}, dev, (1,), (), kw, "k") == fu._BLOCKS_PER_SM * 132
    # shared memory: 100 KB (+1 KB reserved) per block -> 2 per SM, unless the cap is lower
    assert ls.co_resident_cap(kernel(32, 100 * 1024), {}, dev, (1,), (), kw, "k") == \
        min(2, fu._BLOCKS_PER_SM) * 132
    caps = {}
    ls.co_resident_cap(kernel(64, 0), caps, dev, (7,), (), kw, "k")
    n = len(compiled)
    ls.co_resident_cap(kernel(64, 0), caps, dev, (7,), (), kw, "k")
    assert len(compiled) == n  # cached: compiled once per key
    with pytest.raises(RuntimeError, match="the big kernel does not fit one SM"):
        ls.co_resident_cap(kernel(32, 300 * 1024), {}, dev, (1,), (), kw, "the big kernel")
