"""results/<run_name>/: where a run keeps its flags, TensorBoard logs, checkpoints and outputs."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """The code's commit, with '-dirty' when there are uncommitted changes; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


@dataclass
class RunDir:
    root: Path

    @classmethod
    def create(cls, results_dir, run_name: str, make: bool = True) -> "RunDir":
        """The run folder RESULTS_DIR/RUN_NAME, with its subfolders made unless `make` is False (the ranks of a
        data-parallel run other than 0 only read it)."""
        if not run_name or "/" in run_name or run_name in (".", ".."):
            raise ValueError(f"--run_name {run_name!r}: must be a plain folder name")
        run = cls(Path(results_dir) / run_name)
        if make:
            for sub in (run.tb, run.checkpoints, run.eval):
                sub.mkdir(parents=True, exist_ok=True)
        return run

    @property
    def args_json(self) -> Path:
        return self.root / "args.json"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def write_args(self, args: dict) -> None:
        payload = {**args, "git_commit": git_commit()}
        self.args_json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
