"""Helpers shared by the tests."""
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def scaled_err(a, b, scale):
    """max |a - b| / scale: errors measured against the parameters' scale (max |w|),
    since lam and w - w_bar are differences of nearby numbers."""
    return (a.double() - b.double()).abs().max().item() / scale
