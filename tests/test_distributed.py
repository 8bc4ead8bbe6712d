"""Data-parallel training under torchrun: two gloo processes on CPU at 32 px, a few steps each.

Each run goes through `python -m torch.distributed.run` in a subprocess with a deadline, so a hang fails the test
instead of blocking CI. A small entry script (written below) runs train.py in each process, records every file
the process writes under the results folder (Python audit hooks), and saves the process's final parameters
outside that folder for the test to compare.
"""
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN_FLAGS as TINY

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 180

ENTRY = textwrap.dedent('''
    import os, sys
    results, out, script, argv = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    rank = int(os.environ["RANK"])
    writes = []

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            if not (mode and any(c in mode for c in "wax+")) and not (
                    mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                return
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(results):
            writes.append(f"{event} {os.fsdecode(path)}")

    sys.addaudithook(audit)
    import importlib
    import torch
    import engine.training as training
    runs = []
    _init = training._Run.__init__

    def init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        runs.append(self)

    training._Run.__init__ = init
    try:
        importlib.import_module(script).main(argv)
    finally:
        if runs:
            r = runs[0]
            params = {f"encoder.{k}": v.detach().clone() for k, v in r.encoder.named_parameters()}
            params.update({f"scanner.{k}": v.detach().clone() for k, v in r.scanner.named_parameters()})
            torch.save({"params": params, "writes": writes}, os.path.join(out, f"rank{rank}.pt"))
''')


def torchrun(tmp_path, results, *flags, script="train", nproc=2, interrupt_after=None):
    """Run `script` under torchrun with nproc gloo processes; (return code, stdout + stderr, {rank: record}).

    interrupt_after: a regular expression; SIGINT goes to torchrun (as Ctrl-C in its terminal would) once the
    output matches it.
    """
    out = tmp_path / "ranks"
    out.mkdir(exist_ok=True)
    for old in out.glob("rank*.pt"):
        old.unlink()
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(entry), str(results), str(out), script, *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []  # read by a thread: tqdm ends its updates with \r, not a new line
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stdout.fileno(), 65536), b"")),
                              daemon=True)
    reader.start()
    deadline = time.time() + DEADLINE_S
    interrupted = interrupt_after is None
    while proc.poll() is None and time.time() < deadline:
        if not interrupted and re.search(interrupt_after, b"".join(chunks).decode(errors="replace")):
            proc.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.05)
    if proc.poll() is None:
        # SIGTERM lets torchrun stop its workers (they run in their own sessions); then make sure.
        proc.terminate()
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
        reader.join(5)
        pytest.fail(f"torchrun did not finish within {DEADLINE_S} s (a hang?):\n"
                    f"{b''.join(chunks).decode(errors='replace')[-3000:]}")
    reader.join(10)
    output = b"".join(chunks).decode(errors="replace")
    records = {int(p.stem[4:]): torch.load(p, weights_only=True) for p in out.glob("rank*.pt")}
    return proc.returncode, output, records


def _assert_same_parameters(records, checkpoint):
    assert set(records) == {0, 1}
    p0, p1 = records[0]["params"], records[1]["params"]
    assert p0.keys() == p1.keys() and len(p0) > 10
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"{name} differs between the ranks"
        module, key = name.split(".", 1)
        assert torch.equal(p0[name], checkpoint[module][key]), f"{name} differs from the checkpoint"


def test_two_gloo_processes_train_identically_rank0_writes_and_resume(tmp_path, photo_folder):
    results = tmp_path / "results"
    flags = ["--run_name", "ddp", "--results_dir", str(results), "--train_path", str(photo_folder), *TINY]
    code, out, records = torchrun(tmp_path, results, *flags, "--max_step", "4")
    assert code == 0, out
    run = results / "ddp"
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 4
    _assert_same_parameters(records, checkpoint)
    # Each rank continues its own random stream on resumption: seeds are seed + rank.
    ranks = checkpoint["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["cpu"], ranks[1]["cpu"])
    # Rank 0 alone wrote files: one TensorBoard writer, one set of outputs, one log.
    assert records[1]["writes"] == []
    assert any("last.pt" in w for w in records[0]["writes"]) and any("args.json" in w for w in records[0]["writes"])
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert (run / "model" / "config.json").is_file() and (run / "eval" / "summary.json").is_file()
    assert out.count("data: ") == 1 and "rank 0 of 2 processes" in out

    code, out, records = torchrun(tmp_path, results, *flags, "--max_step", "6")
    assert code == 0, out
    assert out.count("resuming") == 1 and "at step 4" in out
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 6 and checkpoint["scheduler"]["last_epoch"] == 6
    assert {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()} == {6}  # Adam continued
    _assert_same_parameters(records, checkpoint)
    assert records[1]["writes"] == []


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_saves(tmp_path, photo_folder):
    results = tmp_path / "results"
    flags = ["--run_name", "stop", "--results_dir", str(results), "--train_path", str(photo_folder), *TINY,
             "--max_step", "100000", "--val_every", "100000", "--save_every", "100000"]
    # the signal goes as soon as tqdm's bar shows any step done (it may jump several at once on a fast CPU), in a
    # run far too long to end on its own
    code, out, records = torchrun(tmp_path, results, *flags, script="train_rs",
                                  interrupt_after=r"\| *[1-9][0-9]*/100000")
    assert "interrupted at step" in out, out
    step = int(out.split("interrupted at step ")[1].split(";")[0])
    checkpoint = torch.load(results / "stop" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == step
    _assert_same_parameters(records, checkpoint)
