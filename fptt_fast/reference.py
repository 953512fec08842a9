"""FPTT in plain PyTorch: the specification in code (Kag & Saligrama, ICML 2021).

Every fused backend of fptt_fast is tested element by element against these functions,
and they are tested against torch.optim, autograd and nn.LSTM. One update (segment p):
  2. g += (rho - 1) * lam + c * alpha * (w - w_bar)   3. g *= min(1, clip / (||g||_2 + 1e-6))
  4. w = base optimiser step (torch SGD/Adam/AdamW)    5. lam -= alpha * (w_new - w_bar_old)
  6. w_bar = (1 - beta) * w_bar + beta * w_new - (beta / alpha) * lam_new
alpha = 0: steps 3-4 only. decoupled=True: 3-4, then w -= lr * (step 2's term at the old w),
then 5-6. Design: docs/ALGORITHM.md (the numbered steps, "The regulariser's three modes")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

OPTIMIZERS = ("sgd", "adam", "adamw")
NONFINITE = ("raise", "skip")

# ----------------------------------------------------------------------------
# Hyper-parameters
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters of one parameter group (clip is global, see FPTT)."""

    lr: float = 1e-3
    alpha: float = 0.5
    beta: float = 0.5
    rho: float = 0.0
    c: float = 1.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    decoupled: bool = False

    @classmethod
    def from_group(cls, group: dict) -> "Hyper":
        return cls(**{f.name: group[f.name] for f in fields(cls)})


def _finite_number(name, value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def validate_hyper(h: dict, optimizer: str) -> None:
    """Raise ValueError naming the first bad field of a hyper-parameter dict."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    lr = _finite_number("lr", h["lr"])
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if _finite_number("alpha", h["alpha"]) < 0:
        raise ValueError(f"alpha must be >= 0 (0: the regulariser off), got {h['alpha']}")
    if h["alpha"] > 0 and float(torch.tensor(float(h["alpha"]), dtype=torch.float32)) == 0:
        # the kernels read float32 and would see the regulariser off; the reference would not
        raise ValueError(f"alpha={h['alpha']} is 0 in float32 (below ~1.4e-45): give 0 to turn the "
                         f"regulariser off, or a larger alpha")
    beta = _finite_number("beta", h["beta"])
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    _finite_number("rho", h["rho"])
    if _finite_number("c", h["c"]) < 0:
        raise ValueError(f"c must be >= 0, got {h['c']}")
    if _finite_number("weight_decay", h["weight_decay"]) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {h['weight_decay']}")
    betas = h["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair, got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= _finite_number(f"betas[{i}]", b) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
    if _finite_number("eps", h["eps"]) < 0:
        raise ValueError(f"eps must be >= 0, got {h['eps']}")
    if _finite_number("momentum", h["momentum"]) < 0:
        raise ValueError(f"momentum must be >= 0, got {h['momentum']}")
    _finite_number("dampening", h["dampening"])
    if not isinstance(h.get("decoupled", False), bool):
        raise ValueError(f"decoupled must be True or False, got {h['decoupled']!r}")
    if h["nesterov"] and (optimizer != "sgd" or h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("nesterov needs optimizer='sgd', momentum > 0 and dampening = 0")


def validate_clip(clip) -> float | None:
    if clip is None:
        return None
    v = _finite_number("clip", clip)
    if v < 0:
        raise ValueError(f"clip must be >= 0 (0 or None: no clipping), got {clip}")
    return v or None


# ----------------------------------------------------------------------------
# The update, per tensor
# ----------------------------------------------------------------------------


def regularizer_grad(w, w_bar, lam, h: Hyper):
    """Step 2: gradient of sum[(rho-1)*lam*w + (c*alpha/2)*(w - w_bar)^2]; zero when
    alpha == 0 (the regulariser off, whatever lam holds)."""
    if h.alpha == 0:
        return torch.zeros_like(w)
    return (h.rho - 1.0) * lam + (h.c * h.alpha) * (w - w_bar)


def regularizer_value(w, w_bar, lam, h: Hyper):
    """The regulariser itself, for logging (0 when alpha == 0)."""
    if h.alpha == 0:
        return torch.zeros((), dtype=w.dtype, device=w.device)
    return ((h.rho - 1.0) * lam * w).sum() + (0.5 * h.c * h.alpha) * ((w - w_bar) ** 2).sum()


def clip_coef(grads, clip):
    """Step 3: torch.nn.utils.clip_grad_norm_'s coefficient, and the norm."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if clip is None:
        return torch.ones_like(norm), norm
    return torch.clamp(clip / (norm + 1e-6), max=1.0), norm


def sgd_step_(w, g, state, h: Hyper):
    """Step 4, torch.optim.SGD (single-tensor path), in place on w."""
    d = g + h.weight_decay * w if h.weight_decay else g
    if h.momentum:
        buf = state["momentum_buffer"]
        if state["step"].item() == 0:
            buf.copy_(d)
        else:
            buf.mul_(h.momentum).add_(d, alpha=1.0 - h.dampening)
        d = d + h.momentum * buf if h.nesterov else buf
    w.add_(d, alpha=-h.lr)
    state["step"] += 1


def adam_step_(w, g, state, h: Hyper, decoupled: bool):
    """Step 4, torch.optim.Adam / AdamW (single-tensor path), in place on w."""
    beta1, beta2 = h.betas
    state["step"] += 1
    step = state["step"].item()
    if h.weight_decay:
        if decoupled:
            w.mul_(1.0 - h.lr * h.weight_decay)
        else:
            g = g + h.weight_decay * w
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    step_size = h.lr / (1.0 - beta1**step)
    denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(h.eps)
    w.addcdiv_(m, denom, value=-step_size)


def dual_average_(w, w_bar, lam, h: Hyper):
    """Steps 5 and 6, with the new w, the old w_bar and then the new lam; alpha == 0
    keeps both."""
    if h.alpha == 0:
        return
    lam.sub_(h.alpha * (w - w_bar))
    w_bar.mul_(1.0 - h.beta).add_(h.beta * w - (h.beta / h.alpha) * lam)


@torch.no_grad()
def fptt_update_(params, grads, states, hypers, optimizer: str, clip=None, nonfinite="raise"):
    """One FPTT update (steps 2-6) of `params` in place.

    params, grads, states, hypers: parallel lists (grads hold the task gradient only;
    they are not modified). Returns (norm, skipped): the global norm, before clipping,
    of the gradient the clip sees (regularised when coupled, the task gradient alone
    when decoupled or alpha == 0), and whether the step was skipped because that norm
    was not finite (nonfinite="skip"; "raise" raises FloatingPointError). Either way a
    non-finite step changes nothing.
    """
    if not params:
        return torch.zeros(()), False
    r = [regularizer_grad(w, s["w_bar"], s["lam"], h) for w, s, h in zip(params, states, hypers)]
    g_in = [g if h.decoupled else g + ri for g, ri, h in zip(grads, r, hypers)]
    # decoupled: g + 0 * r, g itself unless the regulariser's state is inf or NaN
    coef, norm = clip_coef([g + 0 * ri if h.decoupled else g for g, ri, h in zip(g_in, r, hypers)],
                           clip)
    if not torch.isfinite(norm):
        if nonfinite == "raise":
            raise FloatingPointError(
                "FPTT step: the gradient or the regulariser's state (w_bar, lam) holds inf or "
                f"NaN (global norm is {norm.item()}); nothing was updated")
        return norm, True
    for w, g, ri, s, h in zip(params, g_in, r, states, hypers):
        g = g * coef
        if optimizer == "sgd":
            sgd_step_(w, g, s, h)
        else:
            adam_step_(w, g, s, h, decoupled=optimizer == "adamw")
        if h.decoupled:
            w.sub_(h.lr * ri)
        dual_average_(w, s["w_bar"], s["lam"], h)
    return norm, False


def reset_(params, states, hypers, lam=True):
    """End of epoch (the authors do it): w <- w_bar and, with lam=True, lam <- 0. Parameters
    whose group has alpha == 0 keep no average (w_bar stays at its start) and are left alone."""
    with torch.no_grad():
        for w, s, h in zip(params, states, hypers):
            if h.alpha == 0:
                continue
            w.copy_(s["w_bar"])
            if lam:
                s["lam"].zero_()


# ----------------------------------------------------------------------------
# The LSTM: nn.LSTM's conventions, written out
# ----------------------------------------------------------------------------


def layer_names(num_layers: int) -> list[str]:
    """nn.LSTM's parameter names, layer by layer: weight_ih_l{k}, weight_hh_l{k},
    bias_ih_l{k}, bias_hh_l{k}."""
    return [f"{kind}_l{k}" for k in range(num_layers)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def init_lstm_parameters(module, I: int, H: int, num_layers: int, device=None, dtype=torch.float32):
    """nn.LSTM's parameters on `module`: init_rnn_parameters with 4 gates."""
    init_rnn_parameters(module, I, H, num_layers, 4, device, dtype)


def init_rnn_parameters(module, I: int, H: int, num_layers: int, gates: int, device=None,
                        dtype=torch.float32):
    """nn.LSTM's / nn.GRU's parameters on `module` (gates: 4 / 3 blocks of H rows; layer 0
    reads I inputs, the others H), drawn as torch draws them: uniform(-1/sqrt(H), 1/sqrt(H))
    in the order of layer_names."""
    kw = dict(device=device, dtype=dtype)
    bound = 1.0 / math.sqrt(H)
    G = gates * H
    for k in range(num_layers):
        shapes = ((G, I if k == 0 else H), (G, H), (G,), (G,))
        for name, shape in zip(layer_names(num_layers)[4 * k:4 * k + 4], shapes):
            p = nn.Parameter(torch.empty(shape, **kw))
            with torch.no_grad():
                p.uniform_(-bound, bound)
            setattr(module, name, p)


def lstm_layer(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM layer over x [T, B, In] from (h, c) [B, H]: (outputs [T, B, H], (h, c))."""
    pre_x = F.linear(x, w_ih, b_ih)  # all steps at once
    outs = []
    # unbind, not pre_x[t]: indexing inside the loop makes each step's backward build a
    # gradient the size of the whole sequence (quadratic in T)
    for px in pre_x.unbind(0):
        gates = px + F.linear(h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), (h, c)


def gru_layer(x, h, w_ih, w_hh, b_ih, b_hh):
    """One GRU layer over x [T, B, In] from h [B, H], nn.GRU's equations and gate order
    (r, z, n; b_hn inside r's product): (outputs [T, B, H], h)."""
    pre_x = F.linear(x, w_ih, b_ih)  # all steps at once
    outs = []
    for px in pre_x.unbind(0):
        xr, xz, xn = px.chunk(3, dim=1)
        hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs), h


def stacked(layer, module, x, state, num_layers: int):
    """A stacked recurrent forward on `module`'s parameters (layer_names): layer k reads
    layer k-1's outputs. layer(x, state, w_ih, w_hh, b_ih, b_hh) -> (outputs, state), a
    state being a tuple of [B, H] tensors ((h, c) for an LSTM, (h,) for a GRU). `state`:
    that tuple of [B, H] for one layer, [L, B, H] for L > 1 (as returned). Returns (the
    top layer's outputs [T, B, H], state)."""
    if num_layers == 1:
        state = tuple(t[None] for t in state)
    names, out, finals = layer_names(num_layers), x, []
    for k in range(num_layers):
        out, st = layer(out, tuple(t[k] for t in state),
                        *(getattr(module, n) for n in names[4 * k:4 * k + 4]))
        finals.append(st)
    if num_layers == 1:
        return out, finals[0]
    return out, tuple(torch.stack(ts) for ts in zip(*finals))


def lstm_layer_state(x, state, w_ih, w_hh, b_ih, b_hh):
    """lstm_layer on a state tuple (h, c): stacked's layer for an LSTM."""
    return lstm_layer(x, state[0], state[1], w_ih, w_hh, b_ih, b_hh)


def gru_layer_state(x, state, w_ih, w_hh, b_ih, b_hh):
    """gru_layer on a state tuple (h,): stacked's layer for a GRU."""
    out, h = gru_layer(x, state[0], w_ih, w_hh, b_ih, b_hh)
    return out, (h,)


def stacked_lstm(module, x, state, num_layers: int):
    """nn.LSTM's stacked forward on `module`'s parameters: stacked with lstm_layer."""
    return stacked(lstm_layer_state, module, x, state, num_layers)


class ReferenceLSTM(nn.Module):
    """LSTM with nn.LSTM's parameter names, shapes, gate order (i, f, g, o) and stacking,
    so `ReferenceLSTM(...).load_state_dict(nn.LSTM(...).state_dict())` works as is.
    Time-major: x is [T, B, I]; state is (h, c), each [B, H] for one layer, [L, B, H]
    for num_layers=L > 1."""

    def __init__(self, input_size, hidden_size, device=None, dtype=torch.float32, num_layers=1):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        init_lstm_parameters(self, input_size, hidden_size, num_layers, device, dtype)

    def zero_state(self, batch, device=None, dtype=None):
        p = self.weight_hh_l0
        lead = () if self.num_layers == 1 else (self.num_layers,)
        z = torch.zeros(*lead, batch, self.hidden_size, device=device or p.device, dtype=dtype or p.dtype)
        return z, z.clone()

    def forward(self, x, state=None):
        """Returns (outputs [T, B, H], (h, c))."""
        state = state if state is not None else self.zero_state(x.shape[1], x.device, x.dtype)
        if getattr(self, "torch_lstm", False):
            return fused_lstm_forward(self, x, state)
        return stacked_lstm(self, x, state, self.num_layers)


def fused_lstm_forward(lstm, x, state):
    """The same LSTM through torch's fused implementation (what nn.LSTM calls: cuDNN on a
    GPU, oneDNN or ATen's on a CPU), on `lstm`'s parameters: for the command line's
    BPTT baseline and its lstm="torch" runs, where a Python loop over 1000 steps would cost
    more than the training it compares with. cuDNN follows torch.backends.cudnn.allow_tf32
    (TF32 by default)."""
    L = lstm.num_layers
    params = [getattr(lstm, n) for n in layer_names(L)]
    h0, c0 = (state[0][None], state[1][None]) if L == 1 else state
    out, h, c = torch._VF.lstm(x, (h0, c0), params, True, L, 0.0, lstm.training, False, False)
    return out, ((h[0], c[0]) if L == 1 else (h, c))


class LSTMWithHead(nn.Module):
    """ReferenceLSTM followed by nn.Linear(H, O) on the hidden state."""

    def __init__(self, input_size, hidden_size, output_size, device=None, dtype=torch.float32,
                 num_layers=1):
        super().__init__()
        self.lstm = ReferenceLSTM(input_size, hidden_size, device=device, dtype=dtype,
                                  num_layers=num_layers)
        self.head = nn.Linear(hidden_size, output_size, device=device, dtype=dtype)

    def forward(self, x, state=None):
        outs, state = self.lstm(x, state)
        return self.head(outs), state


def task_loss(pred, target, loss: str):
    """MSE (regression) or cross-entropy (classification), mean over the batch
    (and over time steps when pred carries a time axis)."""
    if loss == "mse":
        return F.mse_loss(pred, target)
    if loss == "ce":
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))
    raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")


def segment_loss(model: LSTMWithHead, x, target, state, loss: str, per_step: bool):
    """Loss of one segment from a given (detached) state; returns (loss, new state).
    Terminal: the head on the last hidden state; per-step: mean over the steps."""
    outs, new_state = model.lstm(x, state)
    pred = model.head(outs) if per_step else model.head(outs[-1])
    return task_loss(pred, target, loss), new_state


# ----------------------------------------------------------------------------
# The segment loop
# ----------------------------------------------------------------------------


def segment_bounds(T: int, K: int):
    """K segments of omega = ceil(T/K) steps covering T; raises if fewer are needed."""
    if T < 1 or K < 1:
        raise ValueError(f"T and K must be >= 1, got T={T}, K={K}")
    if K > T:
        raise ValueError(f"K={K} segments need T >= K time steps, got T={T}")
    omega = -(-T // K)
    if -(-T // omega) != K:
        raise ValueError(f"K={K} segments of omega=ceil(T/K)={omega} steps cover T={T} in "
                         f"{-(-T // omega)}: choose K so that ceil(T/ceil(T/K)) == K")
    return [(p * omega, min(T, (p + 1) * omega)) for p in range(K)]


# How a terminal problem weights segment p of K: "ramp", fptt_fast's (p+1)/K (the last
# segment, which sees the whole sequence, weighs 1); "authors", p + 1/K (0.1, 1.1, ..., 9.1
# for K=10: the authors' Add code, whose `p + 1/PARTS` is not (p+1)/PARTS). Adam is blind
# to a common scale but not to the ratio between segments: 10:1 for ramp, 91:1 here.
SEGMENT_WEIGHTS = ("ramp", "authors")


def segment_weights(K: int, schedule: str = "ramp") -> list[float]:
    """The K segment weights of a terminal problem under `schedule` (SEGMENT_WEIGHTS)."""
    if schedule == "ramp":
        return [(p + 1) / K for p in range(K)]
    if schedule == "authors":
        return [p + 1 / K for p in range(K)]
    raise ValueError(f"unknown segment weights {schedule!r}; choose one of: {', '.join(SEGMENT_WEIGHTS)}")


def train_sequence_fptt(model, opt, x, target, K, loss="mse", per_step=False, state=None,
                        weights="ramp"):
    """FPTT over one batch of sequences: K segments, hidden state carried detached,
    one FPTT update (opt.step()) per segment. Terminal problems weight segment p's
    loss by segment_weights(K, weights)[p] and predict the one target from each segment's
    last state; per-step problems take each segment's own targets with weight 1.
    Returns the list of unweighted segment losses (detached)."""
    if state is None:
        state = model.lstm.zero_state(x.shape[1], x.device, x.dtype)
    if per_step and weights != "ramp":
        raise ValueError(f"weights={weights!r} weighs terminal segments; per-step segments weigh 1")
    losses = []
    seg_weights = segment_weights(K, weights)
    for p, (a, b) in enumerate(segment_bounds(x.shape[0], K)):
        state = (state[0].detach(), state[1].detach())
        tgt = target[a:b] if per_step else target
        seg_loss, state = segment_loss(model, x[a:b], tgt, state, loss, per_step)
        weight = 1.0 if per_step else seg_weights[p]
        opt.zero_grad(set_to_none=False)
        (weight * seg_loss).backward()
        opt.step()
        losses.append(seg_loss.detach())
    return losses


def train_sequence_bptt(model, opt, x, target, loss="mse", per_step=False, clip=1.0):
    """BPTT for comparison: one update of a plain torch optimiser per whole sequence."""
    opt.zero_grad(set_to_none=False)
    seq_loss, _ = segment_loss(model, x, target, None, loss, per_step)
    seq_loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return seq_loss.detach()
