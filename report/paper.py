"""The paper's numbers (Qu et al., ICLR 2023 submission), transcribed from the original repository's figures, and
which of the paper's rows a model of ours corresponds to.

`tests/test_paper_tables.py` checks every number here against `../shared/PAPER.md`. The paper trains and tests on
MIRFlickr-25k at 400×400 for 200,000 steps; `setting_differences` says how a run of ours differs from that.
"""
from __future__ import annotations

#: Table 1, anti-forwarding watermark detection accuracy (%), DeepRAFT's rows
TABLE1 = {"plain": 100.0, "plain_da": 100.0, "da_rs": 99.98}
#: Table 2, imperceptibility: (mean, std) of PSNR (dB), SSIM and LPIPS, DeepRAFT's rows
TABLE2 = {
    "plain": {"psnr": (40.7188, 0.9228), "ssim": (0.9968, 0.0003), "lpips": (0.0006, 0.0001)},
    "da_rs": {"psnr": (32.8442, 0.3287), "ssim": (0.9758, 0.0019), "lpips": (0.0096, 0.0008)},
}
#: Table 3's budgets, ε·255
EPS_255 = (2, 4, 8, 16, 32)
#: Table 3, accuracy (%) under L∞ attacks at EPS_255: model row → attack → accuracies
TABLE3 = {
    "plain": {"apgd-ce": (0, 0, 0, 0, 0), "square": (84.38, 15.66, 0, 0, 0), "adaptive": (0, 0, 0, 0, 0)},
    "rs_0.25": {"apgd-ce": (86.80, 58.46, 20.44, 0.40, 0), "square": (99.22, 99.22, 92.23, 90.70, 68.16),
                "adaptive": (86.80, 58.55, 22.61, 21.48, 17.77)},
    "rs_0.5": {"apgd-ce": (97.04, 91.76, 71.22, 50.03, 6.60), "square": (100, 100, 99.98, 99.26, 91.12),
               "adaptive": (97.04, 91.76, 72.54, 50.25, 5.43)},
    "rs_0.75": {"apgd-ce": (94.66, 91.67, 79.97, 50.26, 49.90), "square": (100, 100, 98.48, 99.23, 96.18),
                "adaptive": (94.66, 91.57, 80.00, 50.28, 50.00)},
    "da_rs_0.25": {"apgd-ce": (93.96, 33.85, 8.17, 5.27, 5.27), "square": (99.69, 98.98, 95.12, 84.78, 62.98),
                   "adaptive": (94.89, 84.10, 72.40, 76.45, 63.63)},
}
#: How the paper names each kind of model
KIND_NAMES = {"plain": "Plain", "plain_da": "Plain+DA", "rs": "RS", "da_rs": "Plain+DA+RS"}
KINDS = tuple(KIND_NAMES)
#: The paper's setting
PAPER_SETTING = {"data": "MIRFlickr-25k", "size": 400, "steps": 200_000, "recipe": "original"}


def model_kind(run_args: dict, config: dict, name: str = "") -> str | None:
    """Which kind of the paper's models a run is: 'plain' (train.py), 'plain_da' (train.py --aug), 'rs'
    (train_rs.py) or 'da_rs' (train_rs_aug.py); from its args.json (the training script, --aug, --std), else
    from a model folder's config.json ("sigma") and name; None when it cannot tell."""
    script = run_args.get("script")
    if script == "train_rs_aug" or (script is None and "aug_start" in run_args):
        return "da_rs"
    if script == "train_rs" or (script is None and run_args.get("std") is not None):
        return "rs"
    if script == "train" or (script is None and run_args):
        return "plain_da" if run_args.get("aug") else "plain"
    lowered = name.lower()
    if "rs_aug" in lowered or "da_rs" in lowered:
        return "da_rs"
    if config.get("sigma") is not None:
        return "rs"
    if "baseline" in lowered or "plain" in lowered:
        return "plain"
    return None


def table3_row(kind: str | None, sigma: float | None) -> str | None:
    """The key of TABLE3 for a model of `kind` trained at `sigma` (None when the paper has no such row)."""
    if kind == "plain":
        return "plain"
    if kind in ("rs", "da_rs") and sigma is not None:
        key = f"{'da_rs' if kind == 'da_rs' else 'rs'}_{sigma:g}"
        return key if key in TABLE3 else None
    return None


def setting_differences(run_args: dict, config: dict, data: str, size_text: str) -> list[str]:
    """How a model's training and this evaluation differ from the paper's setting, one short phrase each
    (empty when they match: MIRFlickr at 400×400, 200,000 steps, the original recipe)."""
    out = []
    if "mirflickr" not in (data or "").lower():
        out.append(f"evaluated on {data}, not MIRFlickr-25k")
    train_path = run_args.get("train_path") or config.get("train_path") or ""
    train_path = train_path if isinstance(train_path, str) else " + ".join(map(str, train_path))
    if train_path and "mirflickr" not in train_path.lower():
        out.append(f"trained on {train_path}, not MIRFlickr-25k")
    if "400×400" not in size_text and "400x400" not in size_text:
        out.append(f"{size_text}, not 400×400")
    step = config.get("step", run_args.get("max_step"))
    if step is not None and step != PAPER_SETTING["steps"]:
        out.append(f"{step:,} training steps, not 200,000")
    recipe = run_args.get("recipe")
    if recipe and recipe != "original":
        out.append(f"--recipe {recipe}, not the original code's training")
    return out
