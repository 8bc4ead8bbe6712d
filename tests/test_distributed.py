"""Data-parallel training under torchrun: two gloo processes on CPU at 32 px, a few steps each.

Each run goes through `python -m torch.distributed.run` in a subprocess with a deadline, so a hang fails the test
instead of blocking CI. A small entry script (written below) runs train.py in each process, records every file
the process writes under the results folder (Python audit hooks), and saves the process's final parameters
outside that folder for the test to compare.
"""
import ast
import os
import re
import shutil
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
    argv = [a.replace("{rank}", str(rank)) for a in argv]  # e.g. a results folder per rank, as on separate nodes
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


def _ddp_parameters_of_torch_2_11() -> list:
    path = REPO / "tests" / "data" / "torch_2_11_ddp_parameters.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_every_distributed_data_parallel_call_uses_keywords_torch_2_11_has():
    """The GPU machines run torch 2.11: a keyword from a later torch (forward_sync_buffers, 2.13) is a TypeError
    there at the first torchrun, which CPU tests on a newer torch would not see."""
    known = set(_ddp_parameters_of_torch_2_11())
    assert {"module", "device_ids", "broadcast_buffers", "gradient_as_bucket_view"} <= known
    assert "forward_sync_buffers" not in known
    sources = sorted((REPO / "engine").glob("*.py")) + sorted(REPO.glob("*.py"))
    calls = []
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {"DistributedDataParallel"} | {alias.asname for node in ast.walk(tree)
                                               if isinstance(node, ast.ImportFrom) for alias in node.names
                                               if alias.name == "DistributedDataParallel" and alias.asname}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (getattr(node.func, "id", None) in names
                                               or getattr(node.func, "attr", None) == "DistributedDataParallel"):
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                calls.append(where)
                for kw in node.keywords:
                    assert kw.arg is not None, f"{where}: **kwargs in DistributedDataParallel(...) cannot be checked"
                    assert kw.arg in known, (f"{where}: DistributedDataParallel(..., {kw.arg}=...) does not exist in "
                                             f"torch 2.11 (tests/data/torch_2_11_ddp_parameters.txt)")
                # positional arguments beyond the module would bind by position: keep to keywords
                assert len(node.args) <= 1, f"{where}: pass DistributedDataParallel's options by keyword"
    assert any(c.startswith("engine/training.py:") for c in calls), calls



def test_resume_across_nodes_needs_rank_0s_checkpoint_on_every_node(tmp_path, photo_folder):
    """Two ranks, each with its own results folder (node{rank}), as on two nodes without shared storage: rank 0
    resumes, rank 1 sees no checkpoint; both must stop with the same line, not hang. With rank 0's last.pt
    copied to rank 1's folder both resume at the same step and train on identically."""
    results = tmp_path / "results"
    flags = ["--run_name", "nodes", "--results_dir", str(results / "node{rank}"), "--train_path", str(photo_folder),
             *TINY]
    last = results / "node0" / "nodes" / "checkpoints" / "last.pt"
    code, out, records = torchrun(tmp_path, results, *flags, "--max_step", "3")
    assert code == 0, out
    assert torch.load(last, weights_only=True)["step"] == 3
    assert not (results / "node1").exists()  # rank 1 writes nothing, anywhere

    code, out, records = torchrun(tmp_path, results, *flags, "--max_step", "5")
    line = "rank 1 sees no checkpoint at step 3 that rank 0 resumes from"
    # each rank prints it (torchrun may stop the second before it does, so at least once)
    assert code != 0 and out.count(line) >= 1, out
    assert "--results_dir on shared storage" in out and "resuming" not in out
    assert torch.load(last, weights_only=True)["step"] == 3

    copy = results / "node1" / "nodes" / "checkpoints" / "last.pt"
    copy.parent.mkdir(parents=True)
    shutil.copy(last, copy)
    code, out, records = torchrun(tmp_path, results, *flags, "--max_step", "5")
    assert code == 0, out
    assert out.count("resuming") == 1 and "at step 3" in out
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["step"] == 5 and checkpoint["scheduler"]["last_epoch"] == 5
    _assert_same_parameters(records, checkpoint)
    assert records[1]["writes"] == []
    # DDP built with torch 2.11's keywords, and none that a newer torch warns about
    assert "broadcast_buffers" not in out and "forward_sync_buffers" not in out


def _as_rank(monkeypatch, rank, rank0_says=None, others_say=()):
    """load_resume_checkpoint as rank `rank` of 2, its collectives faked: rank 0's broadcast decision (what rank 0
    would send) and the verdicts of the other ranks. Returns the list of collectives called."""
    import engine.checkpoint as ckpt
    from engine.distributed import Dist
    called = []

    def broadcast(d, obj, src=0):
        called.append(("broadcast", obj))
        return obj if d.rank == src else rank0_says

    def gather(d, obj):
        called.append(("gather", obj))
        verdicts = list(others_say)
        verdicts.insert(d.rank, obj)
        return verdicts

    monkeypatch.setattr(ckpt, "broadcast_object", broadcast)
    monkeypatch.setattr(ckpt, "all_gather_object", gather)
    return Dist(rank=rank, world_size=2, enabled=True), called


def test_resume_decision_single_process_reads_its_checkpoint_without_collectives(tmp_path, monkeypatch):
    from engine.checkpoint import load_resume_checkpoint, save_checkpoint
    _, called = _as_rank(monkeypatch, 0)
    last = tmp_path / "last.pt"
    assert load_resume_checkpoint(last) is None
    save_checkpoint({"step": 7}, last)
    assert load_resume_checkpoint(last)["step"] == 7
    assert called == []


def test_resume_decision_under_torchrun(tmp_path, monkeypatch):
    from engine.checkpoint import load_resume_checkpoint, save_checkpoint
    last = tmp_path / "last.pt"
    # rank 0 broadcasts the step it resumes from, and raises what another rank reports
    d, called = _as_rank(monkeypatch, 0, others_say=[None])
    assert load_resume_checkpoint(last, d) is None and called[0] == ("broadcast", ("step", None))
    save_checkpoint({"step": 4}, last)
    d, called = _as_rank(monkeypatch, 0, others_say=["rank 1 sees no checkpoint at step 4 (...)"])
    with pytest.raises(ValueError, match=r"^rank 1 sees no checkpoint at step 4 \(\.\.\.\)$"):
        load_resume_checkpoint(last, d)
    assert called == [("broadcast", ("step", 4)), ("gather", None)]
    # rank 1: the same step resumes; another step, none, or one where rank 0 has none is refused
    d, called = _as_rank(monkeypatch, 1, rank0_says=("step", 4), others_say=[None])
    assert load_resume_checkpoint(last, d)["step"] == 4 and called[-1] == ("gather", None)
    for rank0_step, expected in ((5, r"rank 1 sees a checkpoint at step 4 \(.*\), not the one at step 5 that rank 0 "
                                     r"resumes from: give every node the same results folder"),
                                 (None, r"rank 1 sees a checkpoint at step 4 \(.*\) but rank 0 sees none")):
        d, _ = _as_rank(monkeypatch, 1, rank0_says=("step", rank0_step), others_say=[None])
        with pytest.raises(ValueError, match=expected):
            load_resume_checkpoint(last, d)
    d, _ = _as_rank(monkeypatch, 1, rank0_says=("step", 4), others_say=[None])
    with pytest.raises(ValueError, match=r"^rank 1 sees no checkpoint at step 4 that rank 0 resumes from \(.*\): give "
                                         r"every node the same results folder \(--results_dir on shared storage\)"):
        load_resume_checkpoint(tmp_path / "elsewhere.pt", d)
    # a checkpoint rank 0 cannot read: rank 0 raises its own error, the others say so, nobody waits
    last.write_bytes(b"not a checkpoint")
    d, called = _as_rank(monkeypatch, 0)
    with pytest.raises(ValueError, match="last.pt: refused, .* not a checkpoint at all"):
        load_resume_checkpoint(last, d)
    assert called[0][1][0] == "error" and len(called) == 1
    d, _ = _as_rank(monkeypatch, 1, rank0_says=("error", "ValueError: last.pt: truncated"))
    with pytest.raises(ValueError, match=r"^rank 0 cannot read the checkpoint it would resume from \(ValueError"):
        load_resume_checkpoint(last, d)
