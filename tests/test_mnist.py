"""Sequential and permuted MNIST (smnist, psmnist) on a tiny synthetic IDX set written
here (no network): the IDX reader against an independent writer, raw and gzipped, in
both folder layouts; corrupt and missing files refused with exit 2 and one line;
--download through a stand-in torchvision; a few training steps of each task and of
compare through the command line; the psmnist permutation fixed across runs, saved in
the checkpoint and restored from it on --resume."""
import gzip
import os
import struct
import sys
import types

import numpy as np
import pytest
import torch

from fptt_fast import cli, mnist, reference, train
from fptt_fast.lstm import FPTTLSTM
from fptt_fast.train import load_checkpoint, make_config

from .test_cli import cli as run_script, ok, rows

N_TRAIN, N_TEST = 64, 32
FAST = ["--hidden", "8", "--batch", "16", "--eval-every", "2", "--no-progress", "--device", "cpu"]
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


# -- an IDX writer of its own (struct + numpy), not the package's reader run backwards ---

def idx_bytes(array, magic=None) -> bytes:
    """IDX: magic (0x0000 08 ndim for unsigned bytes), one big-endian uint32 per
    dimension, then the bytes row-major."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x00000800 | array.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_file(path, data: bytes, gz: bool) -> str:
    path = str(path) + (".gz" if gz else "")
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gz else data)
    return path


def write_mnist(folder, gz=True, seed=0, n_train=N_TRAIN, n_test=N_TEST) -> dict:
    """The four files of a random MNIST-shaped set in `folder` (created); images gzipped
    and labels raw when gz (both kinds of file in one set), all raw otherwise. Returns
    {name: array written}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{part}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{part}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, array in arrays.items():
        write_file(os.path.join(folder, name), idx_bytes(array), gz=gz and "images" in name)
    return arrays


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(folder, arrays) of a synthetic set shared by the tests that only read it."""
    d = tmp_path_factory.mktemp("mnist")
    return str(d), write_mnist(d)


@pytest.fixture(autouse=True)
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def main(capsys, *args):
    """cli.main(args) in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def refused(capsys, root, *args):
    """Run args in `root`; assert exit 2 with one line, nothing on stdout and nothing
    under root changed; return the line."""
    before = snapshot(root)
    code, out, err = main(capsys, *args)
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fptt-fast: error: "), err
    assert "Traceback" not in err and out == ""
    assert snapshot(root) == before, "a refused command changed files"
    return lines[0]


# -- the reader -------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_reads_back_exactly(tmp_path, gz, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = write_mnist(folder, gz=gz, seed=5)
    if gz:  # all four gzipped, not only the images
        for name in NAMES:
            p = folder / name
            if p.exists():
                write_file(p, p.read_bytes(), gz=True)
                p.unlink()
    d = mnist.load(str(tmp_path))
    assert d.n_train == N_TRAIN and d.n_test == N_TEST
    for part, images, labels in (("train", d.train_images, d.train_labels),
                                 ("t10k", d.test_images, d.test_labels)):
        assert images.dtype == torch.uint8 and images.shape == (len(labels), 784)
        assert np.array_equal(images.numpy(), arrays[f"{part}-images-idx3-ubyte"].reshape(-1, 784))
        assert labels.dtype == torch.int64
        assert np.array_equal(labels.numpy(), arrays[f"{part}-labels-idx1-ubyte"])
    names = {os.path.basename(p) for p in d.paths.values()}
    assert names == {n + (".gz" if gz else "") for n in NAMES}


def test_sequences_scale_and_order():
    images = torch.randint(0, 256, (5, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images[0, 0], images[0, 1] = 0, 255
    x = mnist.sequences(images)
    assert x.shape == (784, 5, 1) and x.dtype == torch.float32
    assert x[0, 0, 0] == 0.0 and x[1, 0, 0] == 1.0 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x[:, :, 0], images.t().float() / 255)  # pixel t (row-major) at step t
    perm = mnist.permutation(3)
    xp = mnist.sequences(images, perm)
    assert torch.equal(xp[:, :, 0], x[perm, :, 0])  # step t reads pixel perm[t]


def test_permutation_is_a_fixed_permutation():
    p = mnist.permutation(train.MNIST_PERM_SEED)
    assert torch.equal(p, mnist.permutation(train.MNIST_PERM_SEED))
    assert torch.equal(p.sort().values, torch.arange(784)) and not torch.equal(p, torch.arange(784))
    assert not torch.equal(p, mnist.permutation(train.MNIST_PERM_SEED + 1))
    with pytest.raises(mnist.MNISTError, match="not a permutation"):
        mnist.check_permutation(torch.zeros(784, dtype=torch.int64))


def _corruptions():
    """(file to replace, its new bytes (None: remove it), words of the message)."""
    img = np.zeros((N_TRAIN, 28, 28), np.uint8)
    lab = np.zeros(N_TRAIN, np.uint8)
    good_img = idx_bytes(img)
    return [
        ("train-images-idx3-ubyte.gz", idx_bytes(img, magic=0x00000801), "its magic number is 0x00000801"),
        ("train-images-idx3-ubyte.gz", b"\x00\x00\x08", "only 3 bytes"),
        ("train-images-idx3-ubyte.gz", good_img[:10], "shorter than its 16-byte header"),
        ("train-images-idx3-ubyte.gz", good_img[:-5], "is truncated: its header says 64x28x28 = 50176 bytes"),
        ("train-images-idx3-ubyte.gz", good_img + b"\x00", "damaged (bytes after the data)"),
        ("train-images-idx3-ubyte.gz", idx_bytes(np.zeros((N_TRAIN, 27, 28), np.uint8)),
         "images of 27x28 pixels, MNIST's are 28x28"),
        ("train-images-idx3-ubyte.gz", gzip.compress(good_img)[:40], "corrupt or truncated gzip file"),
        ("train-images-idx3-ubyte.gz", idx_bytes(np.zeros((N_TRAIN - 1, 28, 28), np.uint8)),
         "holds 63 images but"),
        ("train-labels-idx1-ubyte", idx_bytes(np.full(N_TRAIN, 10, np.uint8)), "label 10 is out of range 0..9"),
        ("train-labels-idx1-ubyte", idx_bytes(img), "its magic number is 0x00000803"),
        ("t10k-labels-idx1-ubyte", idx_bytes(lab[:0]), "holds 32 images but"),
        ("t10k-images-idx3-ubyte.gz", idx_bytes(np.zeros((0, 28, 28), np.uint8)), "holds 0 images but"),
    ]


@pytest.mark.parametrize("name,content,message", _corruptions(),
                         ids=[f"{n}:{m[:30]}" for n, _, m in _corruptions()])
def test_corrupt_file_is_refused(tmp_path, capsys, monkeypatch, name, content, message):
    write_mnist(tmp_path / "data")
    (tmp_path / "data" / name).write_bytes(content)  # the file as found, gzip or not by content
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, "train", "smnist", *FAST, "--steps", "1")
    assert message in line and name.removesuffix(".gz") in line, line


@pytest.mark.parametrize("missing", [NAMES, NAMES[2:3]], ids=["all", "one"])
def test_missing_files_are_named(tmp_path, capsys, monkeypatch, missing):
    write_mnist(tmp_path / "mine")
    for name in missing:
        for p in (tmp_path / "mine" / name, tmp_path / "mine" / (name + ".gz")):
            if p.exists():
                p.unlink()
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, "train", "psmnist", "--data-dir", "mine", *FAST)
    where = f"in mine (nor in {os.path.join('mine', 'MNIST', 'raw')})"
    assert where in line and "Put them in mine, give --data-dir DIR" in line and "--download" in line, line
    for name in NAMES:  # all four named: what the task needs
        assert name in line, line
    if len(missing) == 1:
        assert f"missing {where}: t10k-images-idx3-ubyte (the task needs all four" in line, line


def test_default_data_dir_and_a_file_as_data_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no MNIST files in data (nor in" in refused(capsys, tmp_path, "train", "smnist", *FAST)
    (tmp_path / "afile").write_text("x")
    assert "--data-dir afile is not a folder" in refused(capsys, tmp_path, "compare", "smnist",
                                                         "--data-dir", "afile", *FAST)


@pytest.mark.parametrize("args,message", [
    (["train", "smnist", "DATA", "--T", "100"], "the smnist task has T=784"),
    (["train", "psmnist", "DATA", "--K", "29"], "choose K so that"),
    (["train", "smnist", "DATA", "--permute"], "permuted MNIST is the task psmnist"),
    (["train", "smnist", "DATA", "--limit-test", "-1"], "limit_test must be >= 0"),
    (["train", "smnist", "DATA", "--batch", "65"], "batch=65 exceeds the 64 training images"),
    (["compare", "psmnist", "DATA", "--batch", "65"], "batch=65 exceeds the 64 training images"),
    (["train", "smnist", "--data-dir", ""], "--data-dir needs a path"),
    (["train", "add", "--data-dir", "d"], "--data-dir applies to the MNIST tasks"),
    (["compare", "digits", "--limit-test", "5"], "--limit-test applies to the MNIST tasks"),
    (["train", "add", "--download"], "--download applies to the MNIST tasks"),
    (["train", "digits", "--paper"], "--paper has settings for: add, smnist, psmnist; not for digits"),
    (["train", "smnist", "DATA", "--out", "d"], "--out d already holds a run"),
])
def test_bad_mnist_options(tmp_path, capsys, monkeypatch, data, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "log.csv").write_text("step\n")
    args = [a for arg in args for a in (("--data-dir", data[0]) if arg == "DATA" else (arg,))]
    line = refused(capsys, tmp_path, *args, "--hidden", "8", "--no-progress")
    assert message in line, line


# -- --download, through a stand-in torchvision -----------------------------------------

def _fake_torchvision(monkeypatch, fetch):
    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    calls = []

    class MNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            fetch(root)

    datasets.MNIST = MNIST
    tv.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return calls


def test_download_without_torchvision(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails
    line = refused(capsys, tmp_path, "train", "smnist", "--download", *FAST)
    assert "--download needs torchvision, which is not installed" in line and "in data yourself" in line


def test_download_failure(tmp_path, capsys, monkeypatch):
    from urllib.error import URLError

    def no_network(root):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    calls = _fake_torchvision(monkeypatch, no_network)
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, "train", "psmnist", "--download", "--data-dir", "dl", *FAST)
    assert "torchvision could not fetch MNIST into dl" in line and "name resolution" in line, line
    assert calls == [("dl", True, True)]


def test_download_fetches_then_trains(tmp_path, capsys, monkeypatch):
    calls = _fake_torchvision(monkeypatch, lambda root: write_mnist(os.path.join(root, "MNIST", "raw")))
    monkeypatch.chdir(tmp_path)
    code, out, err = main(capsys, "train", "smnist", "--download", *FAST, "--steps", "2", "--out", "r")
    assert code == 0, err
    assert calls == [("data", True, True)] and (tmp_path / "data" / "MNIST" / "raw").is_dir()
    # the files are there now: no second download
    code, _, err = main(capsys, "train", "smnist", "--download", *FAST, "--steps", "2", "--out", "r2")
    assert code == 0 and len(calls) == 1, err


def test_bad_out_is_refused_before_downloading(tmp_path, capsys, monkeypatch):
    calls = _fake_torchvision(monkeypatch, lambda root: write_mnist(os.path.join(root, "MNIST", "raw")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    line = refused(capsys, tmp_path, "train", "smnist", "--download", *FAST, "--out", "afile")
    assert "--out afile is not a folder" in line and calls == []


# -- training through the command line ---------------------------------------------------

def test_train_smnist_console_script(tmp_path, data):
    """The real script: a few steps of sequential MNIST on the fused cpu step, K=10."""
    p = ok(run_script("train", "smnist", "--data-dir", data[0], *FAST, "--steps", "3", "--out", "r",
                      cwd=tmp_path))
    assert "smnist fptt T=784 K=10 H=8 batch=16" in p.stdout and "backend: cpu" in p.stdout
    assert "final [fptt]: step 3" in p.stdout and "test_accuracy" in p.stdout
    r = rows(tmp_path / "r" / "log.csv")
    assert list(r[0]) == ["step", "train_loss", "test_accuracy", "elapsed_s"] and len(r) == 3
    assert r[1]["test_accuracy"] and 0 <= float(r[-1]["test_accuracy"]) <= 1
    assert float(r[-1]["train_loss"]) > 0
    ckpt = load_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))
    assert ckpt["config"]["task"] == "smnist" and ckpt["task"] == {}
    assert (tmp_path / "r" / "loss.png").stat().st_size > 0
    assert os.path.isdir(tmp_path / "r") and not (tmp_path / "runs").exists()


def test_training_uses_the_fused_segment_step(data, monkeypatch):
    """FPTTLSTM.train_sequence with K=10: ten segment updates per batch (79 steps, the
    last 73), on the first state of the batch, terminal cross-entropy."""
    seen = []
    real = FPTTLSTM._train_segment  # train_segment on time-major inputs, what train_sequence runs

    def spy(self, x, target, state, weight):
        seen.append((x.shape[0], weight, target.shape))
        return real(self, x, target, state, weight)

    monkeypatch.setattr(FPTTLSTM, "_train_segment", spy)
    torch.set_num_threads(1)
    run = train.Run(make_config("psmnist", dict(data_dir=data[0], hidden=8, batch=16, steps=1,
                                                      device="cpu")))
    assert isinstance(run.trainer.model, FPTTLSTM) and run.trainer.model.loss == "ce"
    run.trainer.train_batch(*run.task.batch(16, run.gen, run.device))
    assert [s for s, _, _ in seen] == [79] * 9 + [73]
    assert [w for _, w, _ in seen] == [(p + 1) / 10 for p in range(10)]
    assert all(t == (16,) for _, _, t in seen)
    assert reference.segment_bounds(784, 10)[-1] == (711, 784)


def test_paper_settings():
    cfg = make_config("psmnist", {}, paper=True)
    assert (cfg.T, cfg.K, cfg.hidden, cfg.batch, cfg.lr, cfg.alpha, cfg.beta, cfg.clip) == \
        (784, 10, 128, 128, 1e-3, 0.1, 0.5, 1.0)
    assert cfg.steps == 50 * 469 and cfg.eval_every == 469
    assert make_config("smnist", {"hidden": 32}, paper=True).hidden == 32  # options override


def test_evaluation_in_batches(data, monkeypatch):
    """Accuracy over the test set in batches of EVAL_BATCH (here 5, so the 32 images take
    seven batches, the last short) equals one pass over all of them; --limit-test takes
    the first N images."""
    torch.set_num_threads(1)
    run = train.Run(make_config("psmnist", dict(data_dir=data[0], hidden=8, batch=16, steps=1,
                                                      device="cpu")))
    model, task = run.trainer.model, run.task
    with torch.no_grad():
        out, _ = model(mnist.sequences(task.data.test_images, task.permutation))
        want = (out[-1].argmax(1) == task.data.test_labels).float().mean().item()
    monkeypatch.setattr(train, "EVAL_BATCH", 5)
    assert task.evaluate(model) == pytest.approx(want, abs=1e-6)
    assert 0 < want < 1  # a model that is neither always right nor always wrong here
    limited = train.Run(make_config("smnist", dict(data_dir=data[0], hidden=8, batch=16, steps=1, device="cpu",
                                                   limit_test=7)))
    assert torch.equal(limited.task.test_labels, limited.task.data.test_labels[:7])


def test_compare_smnist(tmp_path, capsys, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    code, out, err = main(capsys, "compare", "smnist", "--data-dir", data[0], *FAST, "--steps", "2",
                          "--limit-test", "8")
    assert code == 0, err
    assert "compare fptt, bptt on seeds 0" in out and "[fptt] smnist fptt T=784" in out
    assert "[bptt] smnist bptt T=784" in out and "final [fptt]" in out and "final [bptt]" in out
    r = rows(tmp_path / "runs" / "smnist-compare-T784" / "compare.csv")
    assert list(r[0]) == ["step", "fptt_train_loss", "fptt_test_accuracy", "bptt_train_loss",
                          "bptt_test_accuracy"]
    assert len(r) == 2 and r[-1]["fptt_test_accuracy"] and r[-1]["bptt_test_accuracy"]
    assert float(r[-1]["bptt_test_accuracy"]) * 8 == int(float(r[-1]["bptt_test_accuracy"]) * 8)


# -- the psmnist permutation: fixed, checkpointed, restored ------------------------------

def test_permutation_same_across_runs_and_restored_on_resume(tmp_path, capsys, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    for out, seed in (("a", "0"), ("b", "0"), ("c", "7")):
        code, _, err = main(capsys, "train", "psmnist", "--data-dir", data[0], *FAST, "--steps", "2",
                            "--seed", seed, "--out", out)
        assert code == 0, err
    perms = [load_checkpoint(f"{o}/checkpoint.pt")["task"]["permutation"] for o in "abc"]
    fixed = mnist.permutation(train.MNIST_PERM_SEED)
    for p in perms:  # the same for the same seed, and for another: the task does not move
        assert torch.equal(p, fixed)
    a, b = (load_checkpoint(f"{o}/checkpoint.pt") for o in "ab")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])

    # a checkpoint whose permutation differs from today's randperm (say, another torch)
    # resumes with its own, and saves it again
    ckpt = torch.load("a/checkpoint.pt", weights_only=True)
    own = fixed.flip(0).clone()
    ckpt["task"]["permutation"] = own
    torch.save(ckpt, "old.pt")
    seen = []
    real = mnist.sequences
    monkeypatch.setattr(mnist, "sequences", lambda images, perm=None: seen.append(perm) or real(images, perm))
    code, _, err = main(capsys, "train", "psmnist", "--resume", "old.pt", "--steps", "4", "--no-progress")
    assert code == 0, err
    resumed = load_checkpoint("old.pt")
    assert resumed["step"] == 4 and torch.equal(resumed["task"]["permutation"], own)
    assert seen and all(torch.equal(p, own) for p in seen)  # training and evaluation read with it


@pytest.mark.parametrize("perm,message", [
    (None, "holds no pixel permutation"),
    (torch.zeros(784, dtype=torch.int64), "permutation is damaged: not a permutation"),
    (torch.arange(10), "permutation is damaged"),
])
def test_damaged_permutation_is_refused(tmp_path, capsys, monkeypatch, data, perm, message):
    monkeypatch.chdir(tmp_path)
    assert main(capsys, "train", "psmnist", "--data-dir", data[0], *FAST, "--steps", "2", "--out", "a")[0] == 0
    ckpt = torch.load("a/checkpoint.pt", weights_only=True)
    if perm is None:
        del ckpt["task"]["permutation"]
    else:
        ckpt["task"]["permutation"] = perm
    torch.save(ckpt, "bad.pt")
    line = refused(capsys, tmp_path, "train", "psmnist", "--resume", "bad.pt", "--steps", "3", "--no-progress")
    assert message in line, line


def test_checkpoint_of_the_other_mnist_task_is_refused(tmp_path, capsys, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    assert main(capsys, "train", "smnist", "--data-dir", data[0], *FAST, "--steps", "2", "--out", "s")[0] == 0
    line = refused(capsys, tmp_path, "train", "psmnist", "--resume", "s/checkpoint.pt", "--steps", "3")
    assert "holds the run 'smnist fptt T=784 K=10 H=8 batch=16" in line and "asks for psmnist fptt" in line
