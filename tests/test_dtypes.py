"""FPTT's parameter dtypes: float32 on every backend; float64 on the reference backend
(auto picks it), checked against torch's optimisers in float64 and against the float32
kernels; float16/bfloat16, mixed dtypes and float64 on a float32 kernel refused with a
message naming the alternative."""
import pytest
import torch

import fptt_fast

from .utils import TOL_UPDATE, scaled_err

TORCH_OPT = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
             "adam": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
             "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05))}


@pytest.mark.parametrize("name", sorted(TORCH_OPT))
def test_float64_alpha0_is_torchs_optimiser_in_float64(name, fresh_seed):
    """The regulariser off, float64: torch's optimiser + clip_grad_norm_ in float64 to
    1e-12 (float32 arithmetic anywhere would show as ~1e-7)."""
    torch.manual_seed(fresh_seed)
    cls, kw = TORCH_OPT[name]
    ps = [torch.randn(33, 7, dtype=torch.float64), torch.randn(129, dtype=torch.float64)]
    qs = [p.clone() for p in ps]
    opt = fptt_fast.FPTT(ps, optimizer=name, alpha=0.0, clip=0.5, **kw)
    assert opt.backend == "reference"
    ref = cls(qs, **kw)
    for _ in range(20):
        grads = [torch.randn_like(p) for p in ps]
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(qs, 0.5)
        ref.step()
    for p, q in zip(ps, qs):
        assert p.dtype == torch.float64 and opt.state[p]["w_bar"].dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("decoupled", [False, True])
def test_float64_follows_the_float32_kernel(decoupled, fresh_seed):
    """The regulariser on: float64 (reference) and float32 (cpu kernel) from the same
    start agree to the float32 tolerance over 22 steps."""
    torch.manual_seed(fresh_seed)
    p64 = [torch.randn(300, dtype=torch.float64), torch.randn(33, 7, dtype=torch.float64)]
    p32 = [p.float() for p in p64]
    kw = dict(lr=0.01, alpha=0.4, beta=0.6, rho=0.5, clip=1.0, decoupled=decoupled)
    o64, o32 = fptt_fast.FPTT(p64, **kw), fptt_fast.FPTT(p32, backend="cpu", **kw)
    for _ in range(22):
        for a, b in zip(p64, p32):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.float()
        o64.step()
        o32.step()
    scale = max(p.abs().max().item() for p in p64)
    for a, b in zip(p64, p32):
        assert scaled_err(a, b.double(), scale) <= TOL_UPDATE
        assert scaled_err(o64.state[a]["lam"], o32.state[b]["lam"].double(), scale) <= TOL_UPDATE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_parameters_are_refused_naming_the_way(dtype):
    with pytest.raises(TypeError, match="float32 or float64 parameters, got torch.(b?float16).*"
                                        "float32 master copy"):
        fptt_fast.FPTT([torch.randn(3, dtype=dtype)])


def test_mixed_dtypes_and_float64_on_a_kernel_are_refused():
    with pytest.raises(TypeError, match="one dtype, got torch.float32, torch.float64"):
        fptt_fast.FPTT([torch.randn(3), torch.randn(3, dtype=torch.float64)])
    with pytest.raises(TypeError, match="backend 'cpu' computes in float32; float64 parameters run "
                                        "on backend='reference'"):
        fptt_fast.FPTT([torch.randn(3, dtype=torch.float64)], backend="cpu")
    # a later group of another dtype is refused and leaves the optimiser as it was
    p = torch.randn(3)
    opt = fptt_fast.FPTT([p], backend="reference")
    with pytest.raises(TypeError, match="a group of torch.float64 for parameters of torch.float32"):
        opt.add_param_group({"params": [torch.randn(2, dtype=torch.float64)]})
    assert len(opt.param_groups) == 1
    p.grad = torch.randn(3)
    opt.step()
