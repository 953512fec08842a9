"""The real `fptt-fast` console script (and `python -m fptt_fast`), in subprocesses:
exit codes, the files a run writes, a resumed run against an uninterrupted one, and a
one-line error with exit code 2 (and nothing written) for each kind of bad input."""
import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch

# CLI behaviour, pinned to the CPU (also where a GPU is present: the tests assert "backend: cpu")
TINY = ["--T", "12", "--K", "3", "--hidden", "8", "--batch", "8", "--eval-every", "3", "--no-progress",
        "--device", "cpu"]


def _script():
    here = os.path.join(os.path.dirname(sys.executable), "fptt-fast")
    return here if os.path.exists(here) else shutil.which("fptt-fast")


def cli(*args, cwd, module=False):
    """Run the command; returns the CompletedProcess (text, stdout and stderr captured)."""
    if module:
        cmd = [sys.executable, "-m", "fptt_fast", *args]
    else:
        script = _script()
        assert script, "the fptt-fast console script is not installed (pip install -e .)"
        cmd = [script, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_resume_matches_uninterrupted(tmp_path):
    """6 steps, then resumed to 12 (console script) == 12 in one go (python -m)."""
    first = ok(cli("train", "add", *TINY, "--steps", "6", "--out", "a", "--save", "a.pt", cwd=tmp_path))
    assert "backend: cpu" in first.stdout and "final [fptt]: step 6" in first.stdout
    for name in ("log.csv", "loss.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    ok(cli("train", "add", "--resume", "a.pt", "--steps", "12", "--T", "12", "--out", "b", "--save", "b.pt",
           "--no-progress", cwd=tmp_path))
    ok(cli("train", "add", *TINY, "--steps", "12", "--out", "c", "--save", "c.pt", cwd=tmp_path, module=True))

    b, c = (torch.load(tmp_path / n, weights_only=True) for n in ("b.pt", "c.pt"))
    assert b["step"] == c["step"] == 12
    for k in c["model"]:
        assert torch.equal(b["model"][k], c["model"][k]), k
    for i, st in c["optimizer"]["state"].items():
        for n, t in st.items():
            assert torch.equal(b["optimizer"]["state"][i][n], t), (i, n)
    assert torch.equal(b["data_rng"], c["data_rng"])
    rb, rc = rows(tmp_path / "b" / "log.csv"), rows(tmp_path / "c" / "log.csv")
    assert len(rb) == len(rc) == 12
    drop = lambda r: {k: v for k, v in r.items() if k != "elapsed_s"}  # noqa: E731
    assert [drop(r) for r in rb] == [drop(r) for r in rc]
    assert float(rc[-1]["test_mse"]) > 0


def test_digits_permuted(tmp_path):
    p = ok(cli("train", "digits", "--permute", "--K", "4", "--hidden", "8", "--batch", "16", "--steps", "4",
               "--eval-every", "2", "--no-progress", "--out", "d", cwd=tmp_path))
    assert "test_accuracy" in p.stdout
    r = rows(tmp_path / "d" / "log.csv")
    assert list(r[0]) == ["step", "train_loss", "test_accuracy", "elapsed_s"]
    assert 0.0 <= float(r[-1]["test_accuracy"]) <= 1.0
    assert (tmp_path / "d" / "checkpoint.pt").exists() and (tmp_path / "d" / "loss.png").exists()


def test_compare(tmp_path):
    p = ok(cli("compare", "add", *TINY, "--steps", "3", "--out", "cmp", cwd=tmp_path))
    assert "final [fptt]" in p.stdout and "final [bptt]" in p.stdout
    r = rows(tmp_path / "cmp" / "compare.csv")
    assert list(r[0]) == ["step", "fptt_train_loss", "fptt_test_mse", "bptt_train_loss", "bptt_test_mse"]
    assert len(r) == 3 and r[-1]["fptt_test_mse"] and r[-1]["bptt_test_mse"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_compare_variants_seeds_and_jobs(tmp_path):
    """Three variants on two seeds in two worker processes: a folder per run, every run
    in summary.csv at every evaluation, one column pair per run in compare.csv; the
    same variant and seed as a plain train run gives the same numbers."""
    p = ok(cli("compare", "add", *TINY, "--steps", "6", "--out", "cmp", "--seeds", "3", "5",
               "--variant", "off:alpha=0", "--variant", "dec:decoupled=1,alpha=0.4",
               "--variant", "bptt:algo=bptt", "--jobs", "2", cwd=tmp_path))
    for label in ("off", "dec", "bptt"):
        for seed in (3, 5):
            assert f"final [{label} seed {seed}]" in p.stdout
            assert (tmp_path / "cmp" / label / f"seed{seed}" / "checkpoint.pt").exists()
    summary = rows(tmp_path / "cmp" / "summary.csv")
    assert {(r["variant"], r["seed"], r["step"]) for r in summary} == {
        (v, s, t) for v in ("off", "dec", "bptt") for s in ("3", "5") for t in ("3", "6")}
    header = list(rows(tmp_path / "cmp" / "compare.csv")[0])
    assert header[:3] == ["step", "off-seed3_train_loss", "off-seed3_test_mse"] and len(header) == 13
    ok(cli("train", "add", *TINY, "--steps", "6", "--out", "one", "--seed", "5", "--alpha", "0.4",
           "--regularizer", "decoupled", cwd=tmp_path))
    drop = lambda r: {k: v for k, v in r.items() if k != "elapsed_s"}  # noqa: E731
    assert ([drop(r) for r in rows(tmp_path / "one" / "log.csv")]
            == [drop(r) for r in rows(tmp_path / "cmp" / "dec" / "seed5" / "log.csv")])


@pytest.mark.parametrize("variant,message", [
    ("a b", "the label must be"), ("x:alpha", "is not KEY=VALUE"), ("x:hidden=3", "is not KEY=VALUE"),
    ("x:alpha=big", "alpha must be a float"), ("x:decoupled=maybe", "decoupled must be a bool"),
    ("x:protocol=mine", "unknown protocol 'mine'"), ("x:alpha=-1", "alpha must be >= 0"),
])
def test_compare_bad_variant(tmp_path, variant, message):
    p = cli("compare", "add", *TINY, "--steps", "2", "--variant", variant, cwd=tmp_path)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()


def test_bench(tmp_path):
    p = ok(cli("bench", "--device", "cpu", "--budget", "0.05", "--threads", "1", cwd=tmp_path))
    assert "reference µs" in p.stdout and "cpu µs" in p.stdout
    assert len([line for line in p.stdout.splitlines() if line.startswith("LSTM")]) == 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A valid tiny Add checkpoint, a truncated copy and a corrupt one."""
    d = tmp_path_factory.mktemp("ckpts")
    ok(cli("train", "add", *TINY, "--steps", "2", "--out", "run", "--save", "good.pt", cwd=d))
    data = (d / "good.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "corrupt.pt").write_bytes(b"this is not a checkpoint" * 10)
    return d


BAD = [
    (["train", "mul"], "unknown task 'mul'"),
    (["compare", "mul"], "unknown task 'mul'"),
    (["train", "add", "--backend", "gpu"], "invalid choice: 'gpu'"),
    (["train", "add", "--algo", "sgd"], "invalid choice: 'sgd'"),
    (["compare", "--resume", "run"], "no compare.json there"),
    (["compare"], "compare needs a task"),
    (["train", "add", "--layers", "0"], "layers must be positive"),
    (["train", "add", "--device", "cpu", "--backend", "cuda"], "Available for cpu: reference, cpu"),
    (["train", "add", "--T", "0"], "T must be positive"),
    (["train", "add", "--K", "0"], "K must be positive"),
    (["train", "add", "--steps", "-3"], "steps must be positive"),
    (["train", "add", "--hidden", "0"], "hidden must be positive"),
    (["train", "add", "--batch", "0"], "batch must be positive"),
    (["train", "add", "--T", "4", "--K", "5"], "need T >= K"),
    (["train", "add", "--T", "10", "--K", "6"], "choose K so that"),
    (["train", "add", "--resume", "truncated.pt"], "corrupt or truncated"),
    (["train", "add", "--resume", "corrupt.pt"], "corrupt.pt is not a fptt_fast checkpoint"),
    (["train", "add", "--resume", "missing.pt"], "no checkpoint file"),
    (["train", "digits", "--resume", "good.pt"], "holds the run 'add fptt T=12"),
    (["train", "add", "--resume", "good.pt", "--hidden", "16"], "has hidden size 8, this run asks for 16"),
    (["train", "add", "--steps", "abc"], "invalid int value"),
    (["train", "smnist", "--data-dir", "nowhere"], "no MNIST files in nowhere"),
    (["compare", "psmnist", "--data-dir", "nowhere"], "no MNIST files in nowhere"),
    (["train", "smnist", "--resume", "good.pt"], "holds the run 'add fptt T=12"),
    (["train", "add", "--data-dir", "nowhere"], "--data-dir applies to the MNIST tasks"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input(checkpoints, args, message):
    """Exit 2, one line on stderr naming the problem, and nothing written or changed."""
    d = checkpoints
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    extra = ["--out", "out", "--no-progress"] + (["--save", "new.pt"] if args[0] == "train" else [])
    p = cli(*args, *extra, cwd=d)
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fptt-fast: error: "), p.stderr
    assert message in lines[0], lines[0]
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert after == before, "bad input changed files"


def test_compare_resume_refuses_other_settings(tmp_path):
    """--resume DIR takes what DIR's compare is from its compare.json: a changed variant,
    seed or option is refused (exit 2) and nothing is written; --steps may grow."""
    ok(cli("compare", "add", *TINY, "--steps", "3", "--out", "cmp", cwd=tmp_path))
    before = {p: p.read_bytes() for p in (tmp_path / "cmp").rglob("*") if p.is_file()}
    for extra, option in ((["--variant", "x:alpha=0"], "--variant"), (["--seeds", "4"], "--seeds"),
                          (["--hidden", "16"], "--hidden"), (["--paper"], "--paper")):
        p = cli("compare", "--resume", "cmp", *extra, cwd=tmp_path)
        assert p.returncode == 2 and f"leave out {option}" in p.stderr, p.stderr
    p = cli("compare", "digits", "--resume", "cmp", cwd=tmp_path)
    assert p.returncode == 2 and "is a compare of add, not digits" in p.stderr, p.stderr
    p = cli("compare", "--resume", "cmp", "--steps", "2", cwd=tmp_path)
    assert p.returncode == 2 and "already at step 3" in p.stderr, p.stderr
    assert before == {p: p.read_bytes() for p in (tmp_path / "cmp").rglob("*") if p.is_file()}
    p = ok(cli("compare", "add", "--resume", "cmp", "--steps", "6", "--no-progress", cwd=tmp_path))
    assert "2 resumed" in p.stdout
    assert len(rows(tmp_path / "cmp" / "fptt" / "log.csv")) == 6
