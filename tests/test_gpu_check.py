"""scripts/gpu_check.py, the GPU check, runs its entries on CPU at tiny sizes and reports each one."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_entry_at_tiny_sizes(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.split("== GPU check summary")[-1]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label in ("train.py --recipe original", "train_rs.py --recipe original", "train_rs_aug.py --recipe original",
                  "torchrun --nproc_per_node 1 train.py", "evaluate.py --quick", "losses on the device vs CPU"):
        line = next(row for row in summary.splitlines() if row.startswith(label))
        assert " ok " in line, line
    for script in ("train", "train_rs", "train_rs_aug"):  # the step profile: syncs per step, both layouts
        for recipe in ("original", "robust"):
            for layout in ("on", "off"):
                line = next(row for row in summary.splitlines()
                            if row.startswith(f"step profile {script}.py --recipe {recipe} channels_last {layout}"))
                assert " ok " in line and "syncs/step" in line, line
    assert "img/s" in summary and "all 18 entries passed" in summary
    layouts = proc.stdout.split("== channels_last: off vs on")[-1].split("== GPU check summary")[0]
    assert len([line for line in layouts.splitlines() if "faster" in line]) == 6
    for run in ("train_amp_off", "train_rs_amp_off", "train_rs_aug_amp_off", "torchrun"):
        assert (tmp_path / run / "checkpoints" / "last.pt").is_file()


def test_gpu_check_reports_a_failing_entry_and_exits_1(tmp_path):
    # a file where the runs' folder should be: every training entry fails, the check goes on and says so
    blocker = tmp_path / "blocked"
    blocker.write_text("not a folder")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(blocker)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "entries failed" in proc.stdout
