"""The command line with another initialisation of the models it builds. An experiment
(benchmarks/results/cpu-2cores-2026-12-06-add-T500-init.md), not an option of the CLI.
INIT (comma-separated, applied in this order after torch's uniform draw, from the run's
seeded generator):

  orthogonal   each gate's H x H block of weight_hh an orthogonal matrix
               (torch.nn.init.orthogonal_, gain INIT_GAIN, default 1)
  head-xavier  the head's weight xavier_normal_ (what the authors' Add code does)
  fbias        the forget gate's bias b_ih + b_hh = INIT_FBIAS (default 1) for every unit:
               bias_ih's forget block set to it, bias_hh's to 0 (gate order i, f, g, o)

    INIT=orthogonal python benchmarks/add_init.py train add --T 500 ...
"""
import os
import sys

import torch

from fptt_fast import cli, recurrent, reference

INIT = [m for m in os.environ.get("INIT", "orthogonal").split(",") if m]
GAIN = float(os.environ.get("INIT_GAIN", "1"))
FBIAS = float(os.environ.get("INIT_FBIAS", "1"))
KNOWN = ("orthogonal", "head-xavier", "fbias")
if any(m not in KNOWN for m in INIT):
    raise SystemExit(f"unknown INIT {INIT}; known: {KNOWN}")
_init_rnn = reference.init_rnn_parameters
_init_recurrent = recurrent.FPTTRecurrent.__init__
_init_with_head = reference.LSTMWithHead.__init__


def init_rnn_parameters(module, I, H, num_layers, gates, **kw):
    _init_rnn(module, I, H, num_layers, gates, **kw)
    if "orthogonal" in INIT:
        with torch.no_grad():
            for k in range(num_layers):
                w = getattr(module, f"weight_hh_l{k}")
                for g in range(gates):
                    torch.nn.init.orthogonal_(w[g * H:(g + 1) * H], gain=GAIN)
    if "fbias" in INIT:
        with torch.no_grad():
            for k in range(num_layers):
                getattr(module, f"bias_ih_l{k}")[H:2 * H] = FBIAS
                getattr(module, f"bias_hh_l{k}")[H:2 * H] = 0.0


def _head(module):
    if "head-xavier" in INIT:
        with torch.no_grad():
            torch.nn.init.xavier_normal_(module.head.weight)


def init_recurrent(self, *args, **kwargs):
    _init_recurrent(self, *args, **kwargs)
    _head(self)
    with torch.no_grad():  # FPTTLSTM built its optimiser already: W̄ starts at the new head
        self.optimizer.state[self.head.weight]["w_bar"].copy_(self.head.weight)


def init_with_head(self, *args, **kwargs):
    _init_with_head(self, *args, **kwargs)
    _head(self)


# At import, not under the main guard: compare's --jobs workers (spawned) import this
# file as __mp_main__ and must train with the same initialisation.
reference.init_rnn_parameters = init_rnn_parameters
recurrent.FPTTRecurrent.__init__ = init_recurrent
reference.LSTMWithHead.__init__ = init_with_head

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
