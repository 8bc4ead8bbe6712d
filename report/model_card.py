"""Ship a trained run as a model folder: its weights, config and calibration, and a model card (README.md).

    python -m report.model_card RUN_DIR --out pretrained_models/baseline --title "baseline" \
        --command "python train.py --run_name baseline ..." [--eval RUN_DIR/eval] [--note "..."]

The card states what a reader needs to trust or reproduce the model: the exact training command(s), the steps,
the training wall time and speed (from the run's eval/summary.json), the machine it was measured on, the data
and its split, and evaluate.py's tables for it (every --eval folder's tables.md, with the command that wrote it,
from its results.json). Nothing is measured here; every figure comes from a file the run or evaluate.py wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
from pathlib import Path

import torch

from engine.cli import HelpFormatter
from engine.device import cpu_name
from models.io import CALIBRATION_NAME, CONFIG_NAME, ENCODER_NAME, SCANNER_NAME

CARD_NAME = "README.md"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (train the run to its end first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_name()}, {cores} cores available, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.machine()}")


def _eval_section(eval_dir: Path) -> str:
    results = _read_json(eval_dir / "results.json")
    argv = results.get("settings", {}).get("argv")
    tables = (eval_dir / "tables.md").read_text().strip()
    head = f"### {eval_dir.name}\n\n"
    if argv:
        head += f"```\npython evaluate.py {shlex.join(argv)}\n```\n\n"
    return head + tables.replace("\n# ", "\n#### ").replace("\n## ", "\n#### ") + "\n"


def _data_text(train_path) -> str:
    """--train_path as recorded in args.json (a folder, a list of folders, or None) → the card's words."""
    if not train_path or train_path == "bundled" or train_path == ["bundled"]:
        return "the scikit-image sample photos"
    folders = [train_path] if isinstance(train_path, str) else train_path
    return " + ".join(f"`{folder}`" for folder in folders)


def write_card(run_dir: Path, out: Path, title: str, commands: list[str], eval_dirs: list[Path], notes: list[str],
               overwrite: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    model_dir = run_dir / "model"
    args = _read_json(run_dir / "args.json")
    summary = _read_json(run_dir / "eval" / "summary.json")
    config = _read_json(model_dir / CONFIG_NAME)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: not empty; pass --overwrite to replace the model there")
    out.mkdir(parents=True, exist_ok=True)
    for name in (ENCODER_NAME, SCANNER_NAME, CONFIG_NAME, CALIBRATION_NAME):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
        elif name != CALIBRATION_NAME:
            raise FileNotFoundError(f"{model_dir / name}: missing")

    seconds = summary.get("train_seconds_this_session")
    resumed = args.get("resumed_from_step", 0)
    test, photos = summary["test_crops"], summary["test_photos_native_resolution"]
    lines = [
        f"# {title}", "",
        *[line for note in notes for line in (note, "")],
        "## Training", "",
        "```", *commands, "```", "",
        f"- steps: {summary['step']} (batch {args['batch_size']} of {args['image_size']}×{args['image_size']} crops"
        + (f", scale jitter up to {args['max_crop_scale']}×" if args.get("max_crop_scale", 1) > 1 else "")
        + (f", the scanner's pair moved on the pixel grid by up to {args['grid_shift']} px" if args.get("grid_shift")
           else "") + ")",
        f"- wall time: {seconds / 60:.1f} min for steps {resumed}–{summary['step']} "
        f"({summary['train_images_per_second']} images/s)" if seconds else "- wall time: not recorded",
        f"- machine: {machine()}",
        f"- data: {_data_text(args.get('train_path'))}, split 90/10 train/test with "
        f"--split_seed {args.get('split_seed', 0)}, 2% of train for validation; the test photos were never trained on",
        f"- fine-tuned from: `{args['init_from']}`" if args.get("init_from") else "- trained from scratch",
        f"- encoder: {config['encoder']}; scanner: {config['scanner']}"
        + (f"; smoothing σ {config['sigma']}" if config.get("sigma") else ""),
        f"- commit: {args.get('git_commit', 'unknown')}", "",
        "## End-of-training summary (plain scanner)", "",
        f"- held-out crops ({test['n']} of {args.get('eval_size') or args['image_size']} px): PSNR {test['psnr']:.2f} dB, "
        f"SSIM {test['ssim']:.4f}, accuracy clean {100 * test['acc_clean']:.1f}% / stamped {100 * test['acc_stamped']:.1f}%",
        f"- held-out photos ({photos['n']}, native resolution): PSNR {photos['psnr']:.2f} dB, SSIM {photos['ssim']:.4f}, "
        f"accuracy clean {100 * photos['acc_clean']:.1f}% / stamped {100 * photos['acc_stamped']:.1f}%", "",
    ]
    if (out / CALIBRATION_NAME).is_file():
        cal = _read_json(out / CALIBRATION_NAME)
        lines += [f"`{CALIBRATION_NAME}`: scan.py's threshold {cal['threshold']:.4g} on the score "
                  f"\"{cal['score']}\", chosen on {cal.get('n_clean', '?')} clean held-out images for FPR ≤ "
                  f"{100 * cal['target_fpr']:g}%" + ("" if cal.get("backed") else
                                                     " (too few images to back that FPR with 95% confidence)"), ""]
    if eval_dirs:
        lines += ["## evaluate.py", ""] + [_eval_section(Path(d)) for d in eval_dirs]
    (out / CARD_NAME).write_text("\n".join(line for line in lines if line is not None) + "\n")
    return out / CARD_NAME


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run", type=Path, help="the run folder (holding args.json, model/ and eval/summary.json)")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write, e.g. pretrained_models/rs_aug")
    p.add_argument("--title", required=True, help="the card's heading")
    p.add_argument("--command", action="append", required=True,
                   help="a command that trained the run, exactly as run (repeat for a resumed or chained run)")
    p.add_argument("--eval", action="append", default=[], type=Path,
                   help="an evaluate.py output folder whose tables go in the card (repeatable)")
    p.add_argument("--note", action="append", default=[], help="a paragraph at the top of the card (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    args = p.parse_args(argv)
    try:
        path = write_card(args.run, args.out, args.title, args.command, args.eval, args.note, args.overwrite)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"wrote {path} and the model beside it", file=sys.stderr)


if __name__ == "__main__":
    main()

