"""The one-launch Triton FPTT segment kernel (kernels/lstm_segment.py) against the spec.

Reference: reference.LSTMWithHead with the same weights, segment_loss + autograd for the
task gradients of weight * loss, and fptt_fast.FPTT(backend="reference") for the update.
The kernel gets the state lists of an FPTT(backend="triton") optimiser over copies of the
parameters (its flat buffers, exactly what fused_update takes). Every output of the
kernel (h_out, c_out, loss_out, grads) is poisoned with NaN before each call.

Without a GPU the kernel runs in Triton's interpreter as one program (grid barriers are
no-ops); the multi-program grid, its barriers and grid-independence are checked by the
CUDA tests at the end (skipped without CUDA).
"""
import pytest
import torch

import fptt_fast
from fptt_fast import reference
from fptt_fast.kernels import lstm_segment as ls
from fptt_fast.optim import OPT_CODE, STATUS_LAST_SKIPPED, STATUS_NORM, STATUS_SKIPPED

from .utils import scaled_err

TOL = 1e-4
NAN = float("nan")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Pair:
    """A reference model + reference FPTT, and the kernel's copies + state lists."""

    def __init__(self, I, H, O, optimizer="adam", opt_kw=None, clip=1.0, rho=0.5, c=2.0,
                 lr=1e-2, device="cpu", nonfinite="skip"):
        self.model = reference.LSTMWithHead(I, H, O, device=device)
        m = self.model
        self.pr = [m.lstm.weight_ih_l0, m.lstm.weight_hh_l0, m.lstm.bias_ih_l0,
                   m.lstm.bias_hh_l0, m.head.weight, m.head.bias]
        self.pt = [p.detach().clone() for p in self.pr]
        kw = dict(lr=lr, optimizer=optimizer, clip=clip, rho=rho, c=c, nonfinite=nonfinite,
                  **(opt_kw or {}))
        self.orf = fptt_fast.FPTT(self.pr, backend="reference", **kw)
        self.ot = fptt_fast.FPTT(self.pt, backend="triton", **kw)
        # A random FPTT state (as after some training), the same in both: the regulariser
        # weighs in from the first segment (and Adam is not fed near-zero gradients).
        for a, b in zip(self.pt, self.pr):
            w_bar = a + 0.1 * torch.randn_like(a)
            lam = 0.1 * torch.randn_like(a)
            for o, p in ((self.ot, a), (self.orf, b)):
                o.state[p]["w_bar"].copy_(w_bar)
                o.state[p]["lam"].copy_(lam)
        for p in self.pt:
            p.grad = torch.zeros_like(p)  # the kernel's gradient scratch (stable addresses)
        self.L = self.ot._gather()
        self.hyper = self.ot._hyper_table(torch.device(device))
        self.optimizer = optimizer
        self.clip = float(clip or 0.0)
        self.H, self.O, self.device = H, O, device

    def kernel(self, x, target, h, c, weight, loss, per_step, **kw):
        """One kernel call with poisoned outputs; returns (loss, h, c, grads)."""
        B = x.shape[1]
        h_out = torch.full((B, self.H), NAN, device=self.device)
        c_out = torch.full((B, self.H), NAN, device=self.device)
        loss_out = torch.full((1,), NAN, device=self.device)
        for g in self.L["grads"]:
            g.fill_(NAN)
        L = self.L
        ls.train_segment(x, target, h, c, weight, ls.LOSS_MSE if loss == "mse" else ls.LOSS_CE,
                         per_step, L["params"], L["grads"], L["w_bars"], L["lams"], L["s1s"],
                         L["s2s"], L["steps"], self.hyper, L["group_of"], OPT_CODE[self.optimizer],
                         self.clip, self.ot._status, h_out, c_out, loss_out, **kw)
        return loss_out, h_out, c_out, [g.clone() for g in L["grads"]]

    def ref(self, x, target, h, c, weight, loss, per_step):
        seg_loss, (h2, c2) = reference.segment_loss(self.model, x, target, (h, c), loss, per_step)
        grads = torch.autograd.grad(weight * seg_loss, self.pr)
        for p, g in zip(self.pr, grads):
            p.grad = g
        self.orf.step()
        return seg_loss.detach(), h2.detach(), c2.detach(), list(grads)

    def compare_params(self, tol=TOL):
        scale = max(p.abs().max().item() for p in self.pr)
        for i, (a, b) in enumerate(zip(self.pt, self.pr)):
            err = scaled_err(a, b.detach(), scale)
            assert err <= tol, f"param {i} {tuple(a.shape)}: w error {err:.3g}"
            sa, sb = self.ot.state[a], self.orf.state[b]
            for name in sb:
                if name == "step":
                    assert sa[name].item() == sb[name].item(), (i, sa[name], sb[name])
                    continue
                err = scaled_err(sa[name], sb[name], scale)
                assert err <= tol, f"param {i} {tuple(a.shape)}: {name} error {err:.3g}"


def draw(T, B, I, O, loss, per_step, device="cpu"):
    x = torch.randn(T, B, I, device=device)
    lead = (T, B) if per_step else (B,)
    if loss == "mse":
        target = torch.randn(*lead, O, device=device)
    else:
        target = torch.randint(0, O, lead, device=device)
    return x, target


def check_segment(pair, got, want, tol=TOL):
    (lk, hk, ck, gk), (lr_, hr, cr, gr) = got, want
    assert abs(lk.item() - lr_.item()) <= tol * max(1.0, abs(lr_.item())), (lk.item(), lr_.item())
    assert scaled_err(hk, hr, 1.0) <= 1e-5, "h_out"
    assert scaled_err(ck, cr, 1.0) <= 1e-5 * max(1.0, cr.abs().max().item()), "c_out"
    for i, (a, b) in enumerate(zip(gk, gr)):
        err = scaled_err(a, b, max(b.abs().max().item(), 1e-6))
        assert err <= tol, f"grad {i} {tuple(b.shape)}: error {err:.3g}"
    pair.compare_params(tol)
    assert pair.ot._status[STATUS_LAST_SKIPPED].item() == 0.0
    nt, nr = pair.ot._status[STATUS_NORM].item(), pair.orf._status[STATUS_NORM].item()
    assert abs(nt - nr) <= 1e-4 * nr, (nt, nr)


def run_segments(pair, T, B, I, O, loss, per_step, n_seg, weights=None):
    H, dev = pair.H, pair.device
    hk = torch.randn(B, H, device=dev) * 0.5
    ck = torch.randn(B, H, device=dev) * 0.5
    hr, cr = hk.clone(), ck.clone()
    for p in range(n_seg):
        x, target = draw(T, B, I, O, loss, per_step, dev)
        w = 1.0 if weights is None else weights[p]
        got = pair.kernel(x, target, hk, ck, w, loss, per_step)
        want = pair.ref(x, target, hr, cr, w, loss, per_step)
        check_segment(pair, got, want)
        hk, ck, hr, cr = got[1], got[2], want[1], want[2]  # each carries its own state


# T, B, I, H, O, loss, per_step, optimizer, opt_kw, clip
CASES = [
    (4, 3, 5, 7, 3, "mse", False, "adam", dict(weight_decay=0.01), 1.0),
    (3, 1, 3, 10, 5, "ce", False, "sgd", dict(momentum=0.9, nesterov=True), 0.1),
    (1, 2, 2, 5, 2, "mse", True, "adamw", dict(weight_decay=0.05), None),
    (20, 2, 3, 6, 4, "ce", True, "adam", {}, 1.0),                    # a longer segment
    (3, 5, 3, 70, 2, "mse", False, "sgd", dict(momentum=0.8), 1e6),   # several hidden blocks
    (2, 70, 2, 5, 3, "ce", False, "adam", {}, 1.0),                   # several batch tiles
    (2, 3, 1, 1, 1, "mse", True, "sgd", {}, 1.0),                     # H = I = O = 1
]


@pytest.mark.parametrize("T,B,I,H,O,loss,per_step,optimizer,opt_kw,clip", CASES)
def test_matches_reference(fresh_seed, T, B, I, H, O, loss, per_step, optimizer, opt_kw, clip):
    pair = Pair(I, H, O, optimizer, opt_kw, clip)
    run_segments(pair, T, B, I, O, loss, per_step, n_seg=2, weights=[0.7, 1.3])


@pytest.mark.parametrize("loss,per_step", [("mse", False), ("ce", True)])
def test_ten_segments_carrying_state(fresh_seed, loss, per_step):
    """K = 10 consecutive segments, (h, c) carried, terminal weights (p + 1) / K."""
    K = 10
    pair = Pair(3, 6, 3, "adam", {}, 1.0)
    weights = [1.0] * K if per_step else [(p + 1) / K for p in range(K)]
    run_segments(pair, 3, 2, 3, 3, loss, per_step, n_seg=K, weights=weights)
    assert all(pair.ot.state[p]["step"].item() == K for p in pair.pt)


def test_nonfinite_skip(fresh_seed):
    """A NaN in the input: the step changes nothing, status says so (as the optimiser)."""
    T, B, I, H, O = 3, 2, 3, 5, 2
    pair = Pair(I, H, O, "adam", {}, 1.0)
    h = torch.zeros(B, H)
    c = torch.zeros(B, H)
    x, target = draw(T, B, I, O, "mse", False)
    check_segment(pair, pair.kernel(x, target, h, c, 1.0, "mse", False),
                  pair.ref(x, target, h, c, 1.0, "mse", False))
    before = [p.clone() for p in pair.pt]
    states = [{k: v.clone() for k, v in pair.ot.state[p].items()} for p in pair.pt]
    x, target = draw(T, B, I, O, "mse", False)
    x[1, 0, 2] = NAN
    lk, hk, ck, gk = pair.kernel(x, target, h, c, 1.0, "mse", False)
    pair.ref(x, target, h, c, 1.0, "mse", False)
    assert pair.orf._status[STATUS_LAST_SKIPPED].item() == 1.0  # the reference skipped too
    st = pair.ot._status
    assert st[STATUS_LAST_SKIPPED].item() == 1.0 and st[STATUS_SKIPPED].item() == 1.0
    assert not torch.isfinite(st[STATUS_NORM]).item()
    assert torch.isnan(lk).all() and torch.isnan(gk[0]).any()
    for i, p in enumerate(pair.pt):
        assert torch.equal(p, before[i]), f"param {i} changed"
        for k, v in pair.ot.state[p].items():
            assert torch.equal(v, states[i][k]), f"param {i}: {k} changed"
    pair.compare_params()
    # The next finite segment trains again, from the unchanged state.
    x, target = draw(T, B, I, O, "mse", False)
    check_segment(pair, pair.kernel(x, target, h, c, 1.0, "mse", False),
                  pair.ref(x, target, h, c, 1.0, "mse", False))
    assert st[STATUS_SKIPPED].item() == 1.0


def _bitwise_run(seed, device, T, B, I, H, O, loss, per_step, n_seg=2, **kw):
    torch.manual_seed(seed)
    pair = Pair(I, H, O, "adam", dict(weight_decay=0.01), 1.0, device=device)
    h = torch.zeros(B, H, device=device)
    c = torch.zeros(B, H, device=device)
    outs = []
    for _ in range(n_seg):
        x, target = draw(T, B, I, O, loss, per_step, device)
        lk, h, c, g = pair.kernel(x, target, h, c, 0.5, loss, per_step, **kw)
        outs += [lk, h, c, *g]
    for p in pair.pt:
        outs += [p.clone(), *[v.clone() for v in pair.ot.state[p].values()]]
    outs.append(pair.ot._status.clone())
    return outs


def _assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"output {i} differs"


def test_deterministic_run_to_run(fresh_seed):
    args = ("cpu", 4, 3, 2, 6, 3, "ce", False)
    _assert_bitwise_equal(_bitwise_run(fresh_seed, *args), _bitwise_run(fresh_seed, *args))


def test_workspace_cached_and_inputs_untouched(fresh_seed):
    T, B, I, H, O = 2, 2, 3, 4, 2
    pair = Pair(I, H, O, "sgd", {}, 1.0)
    x, target = draw(T, B, I, O, "mse", True)
    h, c = torch.randn(B, H), torch.randn(B, H)
    copies = [t.clone() for t in (x, target, h, c)]
    pair.kernel(x, target, h, c, 1.0, "mse", True)
    n_ws = len(ls._WORKSPACES)
    ws = next(reversed(ls._WORKSPACES.values()))
    pair.kernel(x, target, h, c, 1.0, "mse", True)
    assert len(ls._WORKSPACES) == n_ws and next(reversed(ls._WORKSPACES.values())) is ws
    for a, b in zip((x, target, h, c), copies):
        assert torch.equal(a, b)


def test_state_updated_in_place(fresh_seed):
    """h_out, c_out may be h0, c0 themselves (the carried state updated in place)."""
    T, B, I, H, O = 3, 70, 2, 5, 2  # two batch tiles in the interpreter's one program
    x, target = draw(T, B, I, O, "mse", False)
    h, c = torch.randn(B, H), torch.randn(B, H)
    outs = []
    for in_place in (False, True):
        torch.manual_seed(fresh_seed)
        pair = Pair(I, H, O, "sgd", {}, 1.0)
        L = pair.L
        hi, ci = h.clone(), c.clone()
        ho, co = (hi, ci) if in_place else (torch.empty(B, H), torch.empty(B, H))
        lo = torch.empty(1)
        ls.train_segment(x, target, hi, ci, 1.0, ls.LOSS_MSE, False, L["params"], L["grads"],
                         L["w_bars"], L["lams"], L["s1s"], L["s2s"], L["steps"], pair.hyper,
                         L["group_of"], OPT_CODE["sgd"], 1.0, pair.ot._status, ho, co, lo)
        outs.append([ho, co, lo, *L["grads"], *pair.pt])
    _assert_bitwise_equal(outs[0], outs[1])


def test_rejects_bad_inputs(monkeypatch):
    T, B, I, H, O = 2, 2, 3, 4, 2
    pair = Pair(I, H, O, "sgd", {}, 1.0)
    x, target = draw(T, B, I, O, "mse", False)
    h, c = torch.zeros(B, H), torch.zeros(B, H)
    with pytest.raises(ValueError, match="target"):
        pair.kernel(x, target[:, :1], h, c, 1.0, "mse", False)
    with pytest.raises(ValueError, match="target"):
        pair.kernel(x, target, h, c, 1.0, "ce", False)  # float targets for ce
    with pytest.raises(ValueError, match="h0"):
        pair.kernel(x, target, h[:1], c, 1.0, "mse", False)
    with pytest.raises(ValueError, match="x"):
        pair.kernel(x.transpose(0, 1), target, h, c, 1.0, "mse", False)
    monkeypatch.setattr(ls, "MAX_HIDDEN", 3)
    with pytest.raises(ValueError, match="MAX_HIDDEN=3"):
        pair.kernel(x, target, h, c, 1.0, "mse", False)


_AOT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fptt_fast.kernels import lstm_segment as ls
fn = ls._lstm_segment_kernel
const = dict(LOSS=1, PER_STEP=True, OPT=1, BB=16, BH=32, BK=32, BR=32, BC=32, OP=16,
             PREC="ieee", CHUNK=4096, BLOCK=1024, PBLOCK=1024)
kinds = {"tab_ptr": "*i64", "chunk_ptr": "*i64", "bar_ptr": "*i32", "tgt_ptr": "*i64"}
sig = {}
for n in fn.arg_names:
    if n in const:
        sig[n] = "constexpr"
    elif n.endswith("_ptr"):
        sig[n] = kinds.get(n, "*fp32")
    else:
        sig[n] = "fp32" if n in ("clip", "dscale", "lscale") else "i32"
k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=4))
print("SHARED", k.metadata.shared, "CUBIN", len(k.asm.get("cubin", b"")))
"""


def test_gpu_path_compiles_for_sm90(tmp_path):
    """The GPU code path (grid barriers, tl.dot tiles >= 16) compiled ahead of time for
    sm_90, no GPU needed: catches what the interpreter does not check."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() or "backend" in r.stderr.lower()
                              and "not found" in r.stderr.lower()):
        pytest.skip("no CUDA compiler toolchain in this triton install")
    assert r.returncode == 0, r.stderr[-3000:]
    shared = int(r.stdout.split("SHARED")[1].split()[0])
    assert 0 < shared <= 48 * 1024, shared  # two blocks per SM on any sm_70+ GPU
    assert int(r.stdout.split("CUBIN")[1].split()[0]) > 0


# ---------------------------------------------------------------------------------
# GPU only: the multi-program grid, its three grid barriers, grid-independence.
# ---------------------------------------------------------------------------------

GPU_CASES = [
    (8, 64, 7, 100, 3, "mse", False),
    (5, 33, 16, 512, 10, "ce", True),
    (1, 1, 3, 37, 1, "mse", False),
]


@cuda
@pytest.mark.parametrize("T,B,I,H,O,loss,per_step", GPU_CASES)
def test_gpu_matches_reference(fresh_seed, T, B, I, H, O, loss, per_step):
    pair = Pair(I, H, O, "adam", {}, 1.0, device="cuda")
    run_segments(pair, T, B, I, O, loss, per_step, n_seg=3, weights=[0.5, 1.0, 2.0])
    ws = next(reversed(ls._WORKSPACES.values()))
    assert ws["barrier"][0].item() == 0  # nobody left waiting


@cuda
@pytest.mark.parametrize("T,B,I,H,O,loss,per_step", GPU_CASES[:2])
def test_gpu_bitwise_independent_of_grid_and_run(fresh_seed, T, B, I, H, O, loss, per_step):
    args = ("cuda", T, B, I, H, O, loss, per_step)
    full = _bitwise_run(fresh_seed, *args)
    _assert_bitwise_equal(full, _bitwise_run(fresh_seed, *args))
    for limit in (1, 3):
        _assert_bitwise_equal(full, _bitwise_run(fresh_seed, *args, grid_limit=limit))


@cuda
def test_gpu_tf32_close(fresh_seed):
    T, B, I, H, O = 6, 32, 8, 128, 4
    a = _bitwise_run(fresh_seed, "cuda", T, B, I, H, O, "mse", False)
    b = _bitwise_run(fresh_seed, "cuda", T, B, I, H, O, "mse", False, tf32=True)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=5e-2, atol=5e-3)


def test_hidden_limit():
    """The real limit, MAX_HIDDEN (checked before anything else is looked at)."""
    H = ls.MAX_HIDDEN + 1
    params = [torch.empty(s) for s in [(4 * H, 1), (4 * H, H), (4 * H,), (4 * H,), (1, H), (1,)]]
    with pytest.raises(ValueError, match=f"MAX_HIDDEN={ls.MAX_HIDDEN}"):
        ls.train_segment(torch.zeros(1, 1, 1), torch.zeros(1, 1), None, None, 1.0, 0, False,
                         params, params, [], [], [], [], [], None, [], 1, 1.0, None,
                         None, None, torch.zeros(1))


def test_out_of_range_class_skips_the_update():
    """The kernel cannot check class indices without a host sync: an index outside
    [0, O) poisons its row, so the update is skipped and counted, as on CUDA."""
    m = fptt_fast.FPTTLSTM(2, 8, 3, loss="ce", backend="triton", check_inputs=False,
                           nonfinite="skip")
    before = [p.detach().clone() for p in m.fptt_parameters()]
    x = torch.randn(4, 2, 2)
    m.train_segment(x, torch.tensor([0, 7]))
    assert m.optimizer.skipped_steps == 1
    for p, q in zip(m.fptt_parameters(), before):
        assert torch.equal(p.detach(), q)
