"""The command line with chrono initialisation (Tallec & Ollivier, ICLR 2018) of every LSTM
reference.LSTMWithHead builds (what `--lstm torch` trains): forget-gate bias
log U(1, CHRONO_TMAX - 1) per unit, input-gate bias its negative, bias_hh zero. Drawn from
its own generator (seed 1234), so every run seed gets the same biases. An experiment
(benchmarks/results/cpu-2cores-2026-12-05-add-T500-chrono.md), not an option of the CLI.

    CHRONO_TMAX=500 python benchmarks/add_chrono.py train add --T 500 ... --lstm torch
"""
import os
import sys

import torch

from fptt_fast import cli, reference

TMAX = float(os.environ.get("CHRONO_TMAX", "500"))
_init = reference.LSTMWithHead.__init__


def chrono_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    H = self.lstm.hidden_size
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in self.lstm.named_parameters():
            if name.startswith("bias_ih"):
                bf = torch.log(torch.rand(H, generator=g) * (TMAX - 2) + 1)
                p[H:2 * H] = bf   # gate order i, f, g, o
                p[:H] = -bf
            elif name.startswith("bias_hh"):
                p.zero_()


if __name__ == "__main__":
    reference.LSTMWithHead.__init__ = chrono_init
    sys.exit(cli.main(sys.argv[1:]))
