"""fptt_fast: fused kernels for FPTT training of recurrent networks.

    opt = fptt_fast.FPTT(model.parameters(), lr=1e-3, clip=1.0)   # any nn.Module
    fptt_fast.backends.available("cpu")                             # what runs here
"""
from . import backends, reference, tasks
from .optim import FPTT
from .lstm import FPTTLSTM
from .gru import FPTTGRU
from .recurrent import FPTTRecurrent

__all__ = ["FPTT", "FPTTGRU", "FPTTLSTM", "FPTTRecurrent", "backends", "reference", "tasks"]
__version__ = "0.1.0"
