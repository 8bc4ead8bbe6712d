"""scripts/mutation_report.py: mutmut's result files counted by module, only the mutants asked for."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mutation_report.py"


def test_counts_by_module_score_and_survivors(tmp_path):
    (tmp_path / "mutants" / "pkg").mkdir(parents=True)
    codes = {"pkg.a.x_f__mutmut_1": 1, "pkg.a.x_f__mutmut_2": 0, "pkg.a.x_f__mutmut_3": 36, "pkg.a.x_g__mutmut_1": 33,
             "pkg.a.x_h__mutmut_1": 0}
    (tmp_path / "mutants" / "pkg" / "a.py.meta").write_text(json.dumps({"exit_code_by_key": codes}))
    run = subprocess.run([sys.executable, str(SCRIPT), "pkg.a.x_f*", "pkg.a.x_g*"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines()[1:3]}
    # killed, survived, timeout, no tests, not run, other, score: 2 of 4 that ran (a timeout counts as killed)
    assert rows["pkg.a"] == ["1", "1", "1", "1", "0", "0", "50.0%"] and rows["all"] == rows["pkg.a"]
    assert "pkg.a.x_f__mutmut_2  (survived)" in run.stdout and "pkg.a.x_g__mutmut_1  (no tests)" in run.stdout
    assert "x_h" not in run.stdout  # not asked for


def test_without_results_it_says_what_to_run(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "x*"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == "error: mutants: no mutmut results here; run `make mutation` first"
