"""The binary layout (fptt_fast/layout.py) is the one the extension was built with, and a
stale extension is refused with a clear error."""
import types

import pytest

from fptt_fast import backends, layout
from fptt_fast.optim import HYPER_FIELDS as OPTIM_FIELDS


def test_python_users_share_one_layout():
    from fptt_fast.kernels import fptt_update, lstm_segment
    assert OPTIM_FIELDS is layout.HYPER_FIELDS
    assert fptt_update._H_COUNT == len(layout.HYPER_FIELDS)
    assert [fptt_update._H_LR, fptt_update._H_EPS, fptt_update._H_NEST] == [
        layout.HYPER_FIELDS.index(n) for n in ("lr", "eps", "nesterov")]
    assert (fptt_update.OPT_SGD, fptt_update.OPT_ADAM, fptt_update.OPT_ADAMW) == (0, 1, 2)
    assert (lstm_segment.LOSS_MSE, lstm_segment.LOSS_CE) == (layout.LOSS_CODE["mse"], layout.LOSS_CODE["ce"])


def test_extension_reports_the_same_layout():
    ext = backends.extension()
    if ext is None:
        pytest.skip(f"fptt_fast._C not usable: {backends.extension_error()}")
    got = dict(ext.layout)
    assert list(got["hyper_fields"]) == list(layout.HYPER_FIELDS)
    assert dict(got["optimizers"]) == layout.OPT_CODE
    assert dict(got["losses"]) == layout.LOSS_CODE
    assert layout.mismatch(ext) is None


@pytest.mark.parametrize("field,value", [
    ("hyper_fields", list(layout.HYPER_FIELDS[1:]) + ["lr"]),   # reordered row
    ("optimizers", {"sgd": 0, "adam": 2, "adamw": 1}),           # swapped codes
    ("losses", {"mse": 1, "ce": 0}),
])
def test_a_stale_layout_is_refused(field, value):
    stale = layout.expected()
    stale[field] = value
    msg = layout.mismatch(types.SimpleNamespace(layout=stale))
    assert msg is not None and field in msg and "stale build" in msg and "pip install" in msg


def test_an_extension_without_a_layout_is_refused():
    msg = layout.mismatch(types.SimpleNamespace())
    assert msg is not None and "older sources" in msg
