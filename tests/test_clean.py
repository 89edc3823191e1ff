"""Leftovers of interrupted writes: `diffmine status` reports them, `diffmine clean` removes them,
and nothing else, and never while a diffmine process is in a step of the run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diffmine
from diffmine import pipeline
from diffmine.cli import main
from diffmine.leftovers import running_steps
from diffmine.lineage import quiet_run
from diffmine.rundir import Run
from diffmine.status import status

# a subprocess of this checkout (not of whatever diffmine is installed), without torch: a second
# diffmine process in a few tens of milliseconds
ENV = {**os.environ, "PYTHONPATH": str(Path(diffmine.__file__).parents[1])}

# writes a run file as every step does, and is SIGKILLed half-way: the leftover of a killed run
KILLED_WRITE = """
import os, signal, sys
from diffmine.atomic import atomic_write

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half a UNet" * 1000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], write)
"""

# holds a step's lock (process 0's, or a data-parallel worker's) until its stdin closes
HOLDS_STEP = """
import sys
from diffmine.lineage import step_lock

with step_lock(sys.argv[1], sys.argv[2], worker=sys.argv[3] == "worker"):
    print("held", flush=True)
    sys.stdin.read()
"""

# takes a step's lock, says so, and lets it go
TAKES_STEP = """
import sys
from diffmine.lineage import step_lock

with step_lock(sys.argv[1], sys.argv[2]):
    print("started", flush=True)
"""


@pytest.fixture
def run(tiny_run, tmp_path) -> Run:
    copy = Run(tmp_path / "run")
    shutil.copytree(tiny_run.path, copy.path)
    return copy


def killed_write(target: Path) -> Path:
    """The temporary file a process killed while writing ``target`` left beside it."""
    result = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], env=ENV, timeout=60)
    assert result.returncode == -9
    (leftover,) = target.parent.glob(f"{target.name}.*.diffmine.tmp")
    return leftover


def test_status_reports_a_killed_write_and_clean_removes_it_and_nothing_else(run, tmp_path, capsys):
    weights = run.model_dir / "trainable.safetensors"
    before = weights.read_bytes()
    leftover = killed_write(weights)
    assert weights.read_bytes() == before  # the rename never happened: the model is whole
    # the dataset copied into the run and listed from there: diffmine never writes in it
    data = run.path / "data"
    shutil.copytree(run.dataset_root, data)
    pipeline.prepare(run, data, "A scene from {label}.", "A scene.", 32)
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's")
    kept = [run.path / "notes.tmp", run.path / "typicality" / "shard-00000.parquet.ABCDEFGH.tmp",
            run.path / "report" / "x.abc.tmp", data / "norland" / "img.12345678.diffmine.tmp",
            run.path / "notes.20241231.tmp"]  # a name of the user's that the pattern once took
    for path in kept:
        path.write_text("the user's")
    link = run.path / "link.abcdefgh.diffmine.tmp"
    link.symlink_to(outside)

    lines = [line for line in status(run).splitlines() if line.startswith("leftovers:")]
    assert lines == ["leftovers: 1 temporary file of interrupted writes, 10.7 KiB: "
                     f"model/{leftover.name}; remove with `diffmine clean --run {run.path}`"]

    assert main(["clean", "--run", str(run.path)]) == 0
    assert capsys.readouterr().out == "removed 1 temporary file of interrupted writes, 10.7 KiB: " \
                                      f"model/{leftover.name}\n"
    assert not leftover.exists() and weights.read_bytes() == before
    assert all(path.read_text() == "the user's" for path in kept + [outside]) and link.is_symlink()
    assert "leftovers:" not in status(run)
    assert main(["clean", "--run", str(run.path)]) == 0
    assert capsys.readouterr().out == f"{run.path}: no leftovers of interrupted writes\n"


@pytest.mark.parametrize("holder", ["step", "worker"])
def test_clean_removes_nothing_while_another_process_runs_a_step(run, capsys, holder):
    """A data-parallel worker counts too: it may still be writing after its process 0 died."""
    leftover = killed_write(run.typicality_dir / "shard-00000.safetensors")
    process = subprocess.Popen([sys.executable, "-c", HOLDS_STEP, str(run.path), "typicality", holder], env=ENV,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n"
        running = "typicality" + (" (data-parallel workers)" if holder == "worker" else "")
        assert main(["clean", "--run", str(run.path)]) == 2
        assert capsys.readouterr().err == (f"diffmine clean: error: {run.path}: a diffmine process is running {running} "
                                           "on this run; clean once it has finished (its temporary files may be writes "
                                           "in progress)\n")
        assert leftover.exists()
        assert f"{running} running now, some may be its writes in progress" in status(run)
    finally:
        process.communicate("", timeout=60)
    assert main(["clean", "--run", str(run.path)]) == 0
    assert not leftover.exists()


def test_a_step_starting_while_clean_holds_the_run_waits_instead_of_failing(run):
    with quiet_run(run.path) as running:
        assert running == []
        process = subprocess.Popen([sys.executable, "-c", TAKES_STEP, str(run.path), "mine"], env=ENV,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)  # at the gate
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out, err) == (0, "started\n", "")


def test_data_parallel_workers_of_a_step_hold_their_own_lock(run):
    with pipeline._locked(run, "typicality", rank=1), quiet_run(run.path) as running:
        assert running == ["typicality (data-parallel workers)"]


def test_the_page_compare_writes_into_run_a_is_a_write_clean_waits_for(run, tiny_run, monkeypatch):
    """compare writes its page into run A outside any step: it holds a lock while it does."""
    from diffmine import compare

    seen, write_text = [], compare.write_text
    monkeypatch.setattr(compare, "write_text", lambda path, html: seen.append(running_steps(run)) or write_text(path, html))
    page = compare.compare_runs(run, tiny_run, examples=1, crops=1)
    assert seen == [["compare"]] and page.parent == run.path / "compare"


def test_clean_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    (tmp_path / "notes.txt.abcdefgh.diffmine.tmp").write_text("the user's")
    assert main(["clean", "--run", str(tmp_path)]) == 2
    assert "not a diffmine run (no lineage.json)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt.abcdefgh.diffmine.tmp"]  # no lock folder made either
