"""The binary layout shared by Python, the Triton kernels and fptt_fast._C, in one place.

- HYPER_FIELDS: the order of a parameter group's hyper-parameter row (C++: fptt_math.h's
  HyperIndex / kHyperNames).
- OPT_CODE: the optimiser family's code (C++: fptt::Optimizer).
- LOSS_CODE: the LSTM loss's code (C++: fptt::lstm::LossCode, lstm_math.h).
fptt_fast.backends' check_extension compares them with _C.layout when the extension loads,
refusing a stale build. Design: docs/KERNELS.md#fptt_fastlayoutpy
"""

HYPER_FIELDS = ("lr", "alpha", "beta", "rho", "c", "weight_decay", "beta1", "beta2", "eps",
                "momentum", "dampening", "nesterov", "decoupled")
H_INDEX = {name: i for i, name in enumerate(HYPER_FIELDS)}
OPT_CODE = {"sgd": 0, "adam": 1, "adamw": 2}
LOSS_CODE = {"mse": 0, "ce": 1}


def expected():
    """What _C.layout must equal."""
    return {"hyper_fields": list(HYPER_FIELDS), "optimizers": dict(OPT_CODE),
            "losses": dict(LOSS_CODE)}


def mismatch(ext):
    """None if the extension's layout matches this module's, else a message saying what
    differs and how to rebuild."""
    got = getattr(ext, "layout", None)
    want = expected()
    if got is None:
        return ("fptt_fast._C reports no binary layout: it was built from older sources; rebuild "
                "it: pip install --no-build-isolation -e .")
    got = {k: (list(v) if k == "hyper_fields" else dict(v)) for k, v in dict(got).items()}
    diffs = [f"{k}: extension {got.get(k)!r}, Python {v!r}" for k, v in want.items() if got.get(k) != v]
    if not diffs:
        return None
    return ("fptt_fast._C was built from other sources than this Python package (a stale build): "
            + "; ".join(diffs) + ". Rebuild it: pip install --no-build-isolation -e .")
