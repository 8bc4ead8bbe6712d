"""scripts/gpu_check.py, the GPU check: every entry at tiny sizes on CPU, its rows written as they come, its time
budget, its preflight, and the torch 2.11 keywords of DistributedDataParallel."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402

PART1 = ("train.py --recipe original", "train_rs.py --recipe original", "train_rs_aug.py --recipe original",
         "torchrun --nproc_per_node 1 train.py", "resume a CPU-written checkpoint on the device",
         "fp16 with loss scaling: save and resume", "dtypes: AMP when training, fp32 when judging",
         "memory at step 50 and step 200")
PART2 = ("losses on the device vs CPU", "train_rs.py → evaluate.py --quick → stamp.py → scan.py --certify",
         "the training loader alone on 64 JPEGs")


def check(tmp_path, *flags, timeout=600):
    return subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny", "--device", "cpu", "--out",
                           str(tmp_path / "runs"), "--report", str(tmp_path / "report"), *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def rows(tmp_path, part):
    return [json.loads(line) for line in (tmp_path / "report" / f"gpu_check_part{part}.jsonl").read_text().splitlines()]


def test_gpu_check_runs_every_entry_at_tiny_sizes_and_writes_each_row(tmp_path):
    proc = check(tmp_path, "--part", "all")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = rows(tmp_path, "all")
    assert written[0]["entry"] == "preflight" and written[0]["status"] == "ok" and written[0]["torch"]
    by_entry = {r["entry"]: r for r in written}
    for label in PART1 + PART2:
        row = next(r for entry, r in by_entry.items() if entry.startswith(label))
        assert row["status"] == "ok", row
    assert "img/s after 1 warm-up steps" in by_entry["train.py --recipe original --amp off"]["detail"]
    assert "resumed at step 2, ended at 4" in by_entry["resume a CPU-written checkpoint on the device"]["detail"]
    assert "training float32, judging float32" in by_entry["dtypes: AMP when training, fp32 when judging"]["detail"]
    chain = next(r for e, r in by_entry.items() if e.startswith("train_rs.py → evaluate.py"))
    assert "scan --certify n 100" in chain["detail"]
    for script in ("train", "train_rs", "train_rs_aug"):  # the step profile: syncs per step, both layouts
        for recipe in ("original", "robust"):
            for layout in ("on", "off"):
                row = by_entry[f"step profile {script}.py --recipe {recipe} channels_last {layout}"]
                assert row["status"] == "ok" and "syncs/step" in row["detail"], row
    assert written[-1] == {**written[-1], "entry": "summary", "status": "ok", "detail": "all 23 entries passed"}
    summary = (tmp_path / "report" / "gpu_check_partall.txt").read_text()
    assert "all 23 entries passed" in summary and summary in proc.stdout
    assert len([line for line in summary.splitlines() if "faster" in line]) == 6
    for run in ("train_amp_off", "train_rs_amp_off", "train_rs_aug_amp_off", "torchrun", "resume_cpu"):
        assert (tmp_path / "runs" / run / "checkpoints" / "last.pt").is_file()


def test_a_failing_entry_is_reported_and_the_call_exits_1(tmp_path):
    (tmp_path / "runs").write_text("not a folder")  # where the runs should go: the training entry fails
    proc = check(tmp_path, "--part", "1", "--only", "train.py --recipe original")
    assert proc.returncode == 1
    written = rows(tmp_path, "1")
    assert [r["status"] for r in written] == ["ok", "FAIL", "FAIL"]
    assert written[1]["error"] and "1 of 1 entries failed" in written[-1]["detail"]


def test_entries_past_the_budget_are_recorded_as_skipped_not_passed(tmp_path):
    proc = check(tmp_path, "--part", "2", "--budget", "0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = rows(tmp_path, "2")
    skipped = [r for r in written if r["status"] == "skipped"]
    assert len(skipped) == len(written) - 2 and all("--only" in r["detail"] for r in skipped)
    assert "all 0 entries passed" in written[-1]["detail"] and "skipped for time" in written[-1]["detail"]


def test_a_failing_preflight_stops_the_call_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cuda", "--part", "1", "--out",
                           str(tmp_path / "runs"), "--report", str(tmp_path / "report")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [proc.stdout.strip().splitlines()[0]]
    assert proc.stdout.startswith("GPU check preflight failed: no CUDA device")
    assert rows(tmp_path, "1") == [{"part": "1", "at_s": rows(tmp_path, "1")[0]["at_s"], "entry": "preflight",
                                    "status": "FAIL", "error": proc.stdout.strip()[len("GPU check preflight "
                                                                                      "failed: "):]}]


def test_preflight_names_a_missing_package_and_the_wheelhouse(monkeypatch):
    monkeypatch.setattr(gpu_check, "PACKAGES", ("numpy", "a_package_that_is_not_installed"))
    try:
        gpu_check.preflight("cpu", tiny=True)
    except gpu_check.PreflightError as e:
        assert "cannot import a_package_that_is_not_installed" in str(e) and "make wheelhouse" in str(e)
    else:
        raise AssertionError("the preflight passed without the package")


def test_preflight_refuses_ddp_keywords_this_torch_lacks(monkeypatch):
    monkeypatch.setattr(gpu_check, "PACKAGES", ())
    monkeypatch.setattr(gpu_check, "MODULES", ())
    monkeypatch.setattr(gpu_check, "ddp_keywords_used", lambda: {"device_ids", "a_keyword_from_the_future"})
    try:
        gpu_check.preflight("cpu", tiny=True)
    except gpu_check.PreflightError as e:
        assert "a_keyword_from_the_future" in str(e)
    else:
        raise AssertionError("the preflight passed a keyword DistributedDataParallel does not take")


def test_the_ddp_keywords_are_read_from_the_training_code():
    assert "device_ids" in gpu_check.ddp_keywords_used()


def test_slim_wheel_drops_a_folder_and_its_record_lines(tmp_path):
    import zipfile
    import slim_wheel
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    record = "pkg/__init__.py,sha256=a,1\npkg/examples/model.pt,sha256=b,9\npkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr("pkg/examples/model.pt", b"\0" * 100_000)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    assert slim_wheel.slim(wheel, "/examples/") == 1
    with zipfile.ZipFile(wheel) as z:
        assert z.namelist() == ["pkg/__init__.py", "pkg-1.0.dist-info/RECORD"]
        assert z.read("pkg/__init__.py") == b"x = 1\n"
        assert z.read("pkg-1.0.dist-info/RECORD").decode() == "pkg/__init__.py,sha256=a,1\npkg-1.0.dist-info/RECORD,,\n"
    assert slim_wheel.slim(wheel, "/examples/") == 0  # nothing left to drop: the wheel is kept as it is
