"""Sequential 8x8 digits: scikit-learn's bundled digits read one pixel per time step.

A small stand-in for the paper's sequential / permuted pixel MNIST (T=784) that needs
no download: T=64 steps of one input each, 10 classes. Every random choice (the
train/test split, the pixel permutation, the training batches) comes from a seeded
torch.Generator, so a seed fixes the data on any machine and a saved generator
state lets a resumed run draw exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import torch

T_DIGITS = 64          # 8 x 8 pixels, one per time step
N_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 20210718  # fixed, independent of the training seed: the test set never moves
PERM_SEED = 784        # the fixed pixel permutation of --permute


class Digits:
    """The digits as time-major sequences, split into a train and a test part.

    x_train/x_test: [T=64, N, 1] floats in [0, 1]; y_train/y_test: [N] class indices.
    """

    def __init__(self, permute: bool = False):
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
        y = torch.tensor(d.target, dtype=torch.long)
        if permute:
            perm = torch.randperm(T_DIGITS, generator=torch.Generator().manual_seed(PERM_SEED))
            x = x[:, perm]
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_test = int(round(TEST_FRACTION * len(y)))
        test, train = order[:n_test], order[n_test:]
        self.x_train, self.y_train = x[train].t().unsqueeze(-1).contiguous(), y[train]
        self.x_test, self.y_test = x[test].t().unsqueeze(-1).contiguous(), y[test]

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    def batch(self, batch: int, generator: torch.Generator):
        """`batch` distinct training sequences drawn with `generator`: x [64, B, 1], y [B]."""
        idx = torch.randperm(self.n_train, generator=generator)[:batch]
        return self.x_train[:, idx], self.y_train[idx]
