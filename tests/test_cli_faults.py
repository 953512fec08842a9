"""The command line as a new user meets it, and under faults: unusable paths, foreign
checkpoints and mismatches refused before training (exit 2, one line, nothing written),
runs that never write over each other, every default in --help, and runs killed by
SIGKILL or stopped by SIGINT that resume bitwise identically.

The refusals call fptt_fast.cli.main in this process (the console script is exactly
that function; an uncaught exception would fail the test, as a traceback would show
it), which keeps them fast; test_cli.py and the fault tests here run the real script."""
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction

import pytest
import torch

from fptt_fast import cli
from fptt_fast.train import load_checkpoint

from .test_cli import cli as run_script, ok, rows

TINY = ["--T", "12", "--K", "3", "--hidden", "8", "--batch", "8", "--eval-every", "3", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def restore_threads():
    """main() sets torch's thread count (--threads, default 1); later tests keep theirs."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def main(capsys, *args):
    """cli.main(args) here: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root):
    """Every file (with its bytes) and folder under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with a finished tiny run (run/), a compare (cmp/), a file, and files that
    are no fptt_fast checkpoint."""
    d = tmp_path_factory.mktemp("world")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert cli.main(["train", "add", *TINY, "--steps", "2", "--out", "run"]) == 0
        assert cli.main(["compare", "add", *TINY, "--steps", "2", "--out", "cmp"]) == 0
    finally:
        os.chdir(cwd)
    (d / "README.md").write_text("a file, not a folder\n")
    (d / "garbage.pt").write_bytes(b"\x00garbage" * 64)
    torch.save({"weight": torch.zeros(4, 2), "bias": torch.zeros(4)}, d / "state_dict.pt")
    torch.save({"lr": Fraction(1, 3)}, d / "pickled.pt")  # unpickling it needs more than weights
    return d


# (command, message) cases: a table of the same shape as test_cli.py's BAD, other cases
REFUSED = [
    # paths: checked before training, named in the user's words
    (["train", "add", "--out", "README.md"], "--out README.md is not a folder"),
    (["train", "add", "--out", "README.md/sub"], "--out README.md/sub: README.md is not a folder"),
    (["train", "add", "--save", "README.md/ck.pt"], "--save README.md/ck.pt: README.md is not a folder"),
    (["train", "add", "--save", "README.md"], "--save README.md already exists"),
    (["train", "add", "--save", "run"], "--save run is a folder"),
    (["train", "add", "--save", "new/"], "--save 'new/' names no file"),
    (["train", "add", "--out", ""], "--out needs a path, got an empty one"),
    (["train", "add", "--resume", ""], "--resume needs a path, got an empty one"),
    (["train", "add", "--out", "run"], "--out run already holds a run (log.csv, loss.png, checkpoint.pt)"),
    (["train", "add", "--out", "new", "--save", "run/checkpoint.pt"], "--save run/checkpoint.pt already exists"),
    (["train", "add", "--out", "new", "--save", "new/log.csv"], "--save new/log.csv is this run's own log.csv"),
    (["compare", "add", "--out", "README.md"], "--out README.md is not a folder"),
    (["compare", "add", "--out", "cmp"], "--out cmp already holds a run (compare.csv"),
    # files that are not fptt_fast checkpoints, refused as such
    (["train", "add", "--resume", "garbage.pt"], "garbage.pt is not a fptt_fast checkpoint"),
    (["train", "add", "--resume", "README.md"], "README.md is not a fptt_fast checkpoint"),
    (["train", "add", "--resume", "state_dict.pt"], "not a fptt_fast checkpoint (a torch file holding a dict "
                                                    "with keys weight, bias"),
    (["train", "add", "--resume", "pickled.pt"], "pickled.pt is not a fptt_fast checkpoint (it holds Python "
                                                 "objects"),
    (["train", "add", "--resume", "run"], "run is a folder, not a checkpoint file"),
    # checkpoints of another task or algorithm, named
    (["train", "add", "--resume", "cmp/bptt/checkpoint.pt", "--steps", "5"],
     "the checkpoint holds the run 'add bptt T=12 K=3 H=8 batch=8 lr=0.02 seed=0 at step 2 of 2'; "
     "this run asks for add fptt (give --algo bptt to resume it)"),
    (["train", "digits", "--resume", "run/checkpoint.pt"], "holds the run 'add fptt T=12"),
    # mismatches in the user's terms; a resume that would train nothing
    (["train", "add", "--resume", "run/checkpoint.pt", "--hidden", "16"],
     "the checkpoint has hidden size 8, this run asks for 16 (leave --hidden out to resume it)"),
    (["train", "add", "--resume", "run/checkpoint.pt", "--steps", "5", "--backend", "reference"],
     "the checkpoint holds the fused FPTTLSTM model"),
    (["train", "add", "--resume", "cmp/bptt/checkpoint.pt", "--algo", "bptt"],
     "the checkpoint's run is complete (step 2 of 2); give --steps above 2 to train on"),
]
if os.path.isdir("/proc/self"):  # Linux: a folder nobody can create files in
    REFUSED += [(["train", "add", "--out", "/proc/forbidden"], "--out: cannot create folder /proc/forbidden"),
                (["train", "add", "--out", "/proc"], "--out: cannot write in folder /proc"),
                (["compare", "add", "--out", "/proc/forbidden"], "--out: cannot create folder /proc/forbidden")]


@pytest.mark.parametrize("args,message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_before_training(world, capsys, monkeypatch, args, message):
    """Exit 2, one line on stderr naming the problem, no advice to load unsafely, and
    nothing written, created or changed (no training happened: nothing on stdout)."""
    monkeypatch.chdir(world)
    before = snapshot(world)
    tiny = [a for a in TINY if a != "--no-progress"] if "--resume" not in args else []
    code, out, err = main(capsys, *args, *tiny, "--no-progress")
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fptt-fast: error: "), err
    assert message in lines[0], lines[0]
    assert "weights_only" not in err and "Traceback" not in err
    assert out == ""
    assert snapshot(world) == before, "a refused command changed files"


def test_refusal_in_the_console_script(world):
    """The real script (test_cli.py has more): one line, exit 2, no training, no traceback."""
    p = run_script("train", "add", "--no-progress", "--save", "README.md/ck.pt", cwd=world)
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
    assert p.stderr == "fptt-fast: error: --save README.md/ck.pt: README.md is not a folder\n", p.stderr


def test_runs_never_overwrite_each_other(tmp_path, capsys, monkeypatch):
    """The same command twice: two folders. A checkpoint copied elsewhere and resumed
    continues in its own folder; the original run's files stay byte-identical."""
    monkeypatch.chdir(tmp_path)
    assert main(capsys, "train", "add", *TINY, "--steps", "3")[0] == 0
    assert main(capsys, "train", "add", *TINY, "--steps", "3")[0] == 0
    assert sorted(os.listdir("runs")) == ["add-fptt-T12", "add-fptt-T12-2"]
    original = tmp_path / "runs" / "add-fptt-T12"
    (tmp_path / "copy").mkdir()
    shutil.copy(original / "checkpoint.pt", tmp_path / "copy" / "ck.pt")
    runs_before = snapshot(tmp_path / "runs")

    code, out, err = main(capsys, "train", "add", "--resume", "copy/ck.pt", "--steps", "6", "--no-progress")
    assert code == 0, err
    assert snapshot(tmp_path / "runs") == runs_before, "resuming a copy wrote over the original run"
    assert sorted(os.listdir("copy")) == ["ck.pt", "log.csv", "loss.png"]
    assert load_checkpoint("copy/ck.pt")["step"] == 6 and len(rows("copy/log.csv")) == 6
    assert f"wrote {os.path.join('copy', 'log.csv')}" in out

    # pointing the copy at the original's folder is refused, naming how to continue that run
    copy_before = snapshot(tmp_path / "copy")
    code, _, err = main(capsys, "train", "add", "--resume", "copy/ck.pt", "--steps", "9",
                        "--out", str(original), "--no-progress")
    assert code == 2 and "already holds a run" in err and "--resume" in err, err
    assert snapshot(tmp_path / "runs") == runs_before and snapshot(tmp_path / "copy") == copy_before

    # the original resumed in place continues its own files, and touches nothing else
    code, _, err = main(capsys, "train", "add", "--resume", str(original / "checkpoint.pt"), "--steps", "5",
                        "--no-progress")
    assert code == 0, err
    assert load_checkpoint(str(original / "checkpoint.pt"))["step"] == 5
    assert snapshot(tmp_path / "copy") == copy_before
    assert sorted(os.listdir("runs")) == ["add-fptt-T12", "add-fptt-T12-2"]


def _help_blocks(text):
    """{first option string: its help text} from argparse's "options:" section."""
    blocks, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("command", ["train", "compare", "bench"])
def test_help_shows_every_default(capsys, command):
    code, out, _ = main(capsys, command, "--help")
    assert code == 0
    blocks = _help_blocks(out)
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    options = {a.option_strings[0] for a in sub._actions if a.option_strings and a.dest != "help"}
    assert options <= set(blocks), f"options missing from --help: {options - set(blocks)}"
    for option in options:
        assert "default" in blocks[option] and "None" not in blocks[option], blocks[option]
    if command != "bench":  # the task defaults, as make_config applies them
        assert "(default: add 30, digits 64; --paper: 1000)" in blocks["--T"], blocks["--T"]
        assert "(default: add 32, digits 64; --paper: 128)" in blocks["--hidden"], blocks["--hidden"]
        assert "(default: 0.5)" in blocks["--alpha"] and "(default: auto)" in blocks["--backend"]
    else:
        assert "(default: 0.6)" in blocks["--budget"] and "(default: auto)" in blocks["--device"]


# -- faults: a real training process, killed or interrupted mid-way ----------------------

FAULT_RUN = ["train", "add", "--T", "12", "--K", "3", "--hidden", "8", "--batch", "8", "--eval-every", "50",
             "--steps", "2000", "--no-progress"]
FIRST_SAVE, STEPS = 50, 2000  # ~1.5 s of training after the first checkpoint: time to stop it mid-way


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    ok(run_script(*FAULT_RUN, "--out", "run", cwd=d))
    return d / "run"


def start_and_wait_for_checkpoint(cwd):
    """Start the fault run, return (process, its checkpoint path) once its first
    checkpoint exists: training is then under way, far from its end."""
    proc = subprocess.Popen([sys.executable, "-m", "fptt_fast", *FAULT_RUN, "--out", "run"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path = cwd / "run" / "checkpoint.pt"
    wait_for(proc, path)
    return proc, path


def wait_for(proc, path):
    """Return once `path` exists (proc's first checkpoint); fail if proc ends first."""
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before its first checkpoint: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint after 120 s")
        time.sleep(0.005)


def assert_same_run(a_dir, b_dir):
    """Final checkpoints bitwise equal (model, optimizer, RNG states) and equal logs
    (but for wall-clock time)."""
    a, b = (load_checkpoint(str(d / "checkpoint.pt")) for d in (a_dir, b_dir))
    assert a["step"] == b["step"] == STEPS
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, b["optimizer"]["state"][i][name]), (i, name)
    assert torch.equal(a["data_rng"], b["data_rng"]) and torch.equal(a["torch_rng"], b["torch_rng"])
    drop = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert drop(rows(a_dir / "log.csv")) == drop(rows(b_dir / "log.csv"))


def test_sigkill_resumes_bitwise(tmp_path, uninterrupted):
    proc, path = start_and_wait_for_checkpoint(tmp_path)
    proc.kill()  # SIGKILL: no handler runs, whatever the process was writing
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = load_checkpoint(str(path))["step"]  # whole, though killed at any point
    assert FIRST_SAVE <= step < STEPS and step % FIRST_SAVE == 0
    ok(run_script("train", "add", "--resume", "run/checkpoint.pt", "--steps", str(STEPS), "--no-progress",
                  cwd=tmp_path))
    assert_same_run(tmp_path / "run", uninterrupted)


def test_sigint_saves_and_resumes_bitwise(tmp_path, uninterrupted):
    proc, path = start_and_wait_for_checkpoint(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    step = load_checkpoint(str(path))["step"]  # saved at the step under way, not the last evaluation
    assert FIRST_SAVE < step < STEPS
    hint = "fptt-fast train add --algo fptt --resume run/checkpoint.pt"
    assert err.strip() == (f"fptt-fast: interrupted at step {step}; saved run/checkpoint.pt "
                           f"(continue with: {hint})"), err
    assert len(rows(tmp_path / "run" / "log.csv")) == step
    ok(run_script(*hint.split()[1:], "--no-progress", cwd=tmp_path))  # the hint, as given
    assert_same_run(tmp_path / "run", uninterrupted)


def test_sigint_hint_of_a_bptt_run_works(tmp_path):
    """A BPTT run's hint names --algo bptt (without it, resume refuses the checkpoint)."""
    proc = subprocess.Popen([sys.executable, "-m", "fptt_fast", *FAULT_RUN, "--algo", "bptt", "--out", "run"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(proc, tmp_path / "run" / "checkpoint.pt")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    hint = err.strip().split("(continue with: ")[1].rstrip(")")
    assert hint == "fptt-fast train add --algo bptt --resume run/checkpoint.pt"
    ok(run_script(*hint.split()[1:], "--no-progress", cwd=tmp_path))
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"] == STEPS


# A compare of two variants, one seed: run "a" then run "b" (one job) or both at once (two).
COMPARE_RUN = ["compare", "add", "--T", "12", "--K", "3", "--hidden", "8", "--batch", "8", "--eval-every",
               "50", "--steps", str(STEPS), "--no-progress", "--variant", "a:alpha=0",
               "--variant", "b:algo=bptt", "--variant", "c:alpha=0.1"]


@pytest.fixture(scope="module")
def uninterrupted_compare(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted_compare")
    ok(run_script(*COMPARE_RUN, "--out", "cmp", cwd=d))
    return d / "cmp"


@pytest.mark.parametrize("jobs", [1, 2])
def test_sigint_during_compare_resumes_bitwise(tmp_path, uninterrupted_compare, jobs):
    """Ctrl-C (SIGINT to the process group, workers included) during a compare of three
    runs: exit 130 and a hint; the runs under way saved, the third (with two jobs: queued
    in the pool) never started; the hint's command finishes every run, bitwise the
    uninterrupted compare, and writes the compare's files."""
    proc = subprocess.Popen([sys.executable, "-m", "fptt_fast", *COMPARE_RUN, "--out", "cmp",
                             "--jobs", str(jobs)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(proc, tmp_path / "cmp" / "a" / "checkpoint.pt")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not (tmp_path / "cmp" / "compare.csv").exists()
    hint = err.strip().split("(continue with: ")[1].rstrip(")")
    assert hint == "fptt-fast compare --resume cmp"
    assert not (tmp_path / "cmp" / "c" / "checkpoint.pt").exists()  # the third never started
    second = ok(run_script(*hint.split()[1:], cwd=tmp_path))
    assert "compare a, b, c on seeds 0: 3 runs of 2000 batches (0 complete, " in second.stdout, second.stdout
    for run in ("a", "b", "c"):
        assert_same_run(tmp_path / "cmp" / run, uninterrupted_compare / run)
    drop = lambda rs: [{k: v for k, v in r.items() if "elapsed" not in k} for r in rs]  # noqa: E731
    assert drop(rows(tmp_path / "cmp" / "compare.csv")) == drop(rows(uninterrupted_compare / "compare.csv"))
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0")])
def test_full_disk_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys, error):
    """A write that fails mid-run (the disk fills at the second checkpoint): one line
    naming the file and the cause, exit 1, no traceback; the first checkpoint is whole."""
    monkeypatch.chdir(tmp_path)
    real_save, calls = torch.save, []

    def filling_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half")
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_save)
    code = cli.main(["train", "add", *TINY, "--steps", "6", "--out", "full"])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fptt-fast: error: cannot write ")
    assert os.path.join("full", "checkpoint.pt") in lines[0] and str(error).split(":")[0][:20] in lines[0]
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(os.path.join("full", "checkpoint.pt"))["step"] == 3


def test_a_bug_while_saving_is_not_called_a_write_failure(tmp_path, monkeypatch, capsys):
    """Only OSError and torch's zip-writer errors mean the disk failed; another
    RuntimeError during a save is a bug and keeps its traceback."""
    monkeypatch.chdir(tmp_path)

    def broken_save(obj, f, *a, **k):
        raise RuntimeError("a bug in a payload")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="a bug in a payload"):  # python prints it, exit 1
        cli.main(["train", "add", *TINY, "--steps", "6", "--out", "bug"])
    assert "cannot write" not in capsys.readouterr().err
