"""The training recipes, as data: every setting of the original code (`original`, the default), ours for small
crops on CPU (`robust`), and `robust_v1`, the robust recipe as the shipped models and the demo were trained (no
perceptual shaping, no resampling stage, the nine-corruption chain).

A recipe is a table of flag values. `engine.cli.parse` fills every flag the command line did not give from the table
before anything is built; a flag given explicitly always wins. Nothing else in the project reads the recipe's
name: the code branches on the settings themselves (`clamp_stamp`, `aug_chain`, `train_crop`, ...). The Fidelity
table (docs/fidelity.md) lists each difference, why `robust` makes it, and the flag that restores the original.
"""
from __future__ import annotations

#: Where the original trains by default (its setting.yaml), and what it downloads there.
MIRFLICKR_DIR = "./mirflickr/"

RECIPES: dict[str, dict] = {
    "original": {
        # data
        "train_path": MIRFLICKR_DIR, "image_size": 400, "train_crop": "fit", "batch_size": 64,
        # networks
        "encoder": "stegastamp", "scanner": "deepraft", "padding_mode": "zeros", "max_residual": 0.0,
        "clamp_stamp": False, "bn_freeze_step": -1,
        # optimisation: Adam 5e-5, ExponentialLR(0.999875) stepped once per epoch
        "lr": 5e-5, "lr_decay": 0.999875, "lr_decay_steps": 1, "lr_decay_unit": "epoch", "amp": "off",
        "max_step": 40_000, "max_epoch": 2_000,
        # losses: img_w·(YUV MSE (1, 100, 100) + 1.0·mean|δ|) + lps_w·LPIPS, weighted by min(img_w·step, 1)
        "img_w": 1.0, "l1_w": 1.0, "lps_w": 1.0, "rs_w": 1.0, "y_scale": 1.0, "u_scale": 100.0, "v_scale": 100.0,
        "warmup_steps": 0, "ramp_steps": 1, "ramp_scaled_by_img_w": True,
        # augmentation (train.py --aug, train_rs_aug.py)
        "aug": False, "aug_chain": "original", "aug_prb": 0.75, "plain_ce": False, "aug_strength_ramp": False,
        "aug_start": 0, "aug_end": 1, "aug_w": 1.0, "augs": "all",
        # resampling in the augmented view (ours, augment.resample): the original's chain keeps every image 400x400
        "aug_resample": False,
        # perceptual shaping (ours, docs/method.md): the original has neither the JND map nor the flat-weighted loss
        "jnd": 0.0, "flat_w": 0.0,
        # logging: scalars every 20 steps, validation every log_interval, weights every save_interval
        "log_every": 20, "val_every": 2_000, "save_every": 5_000,
    },
    "robust": {
        "train_path": "bundled", "image_size": 400, "train_crop": "random", "batch_size": 16,
        "encoder": "unet", "scanner": "resnet18", "padding_mode": "replicate", "max_residual": 0.05,
        "clamp_stamp": True, "bn_freeze_step": None,
        "lr": 1e-4, "lr_decay": 0.5, "lr_decay_steps": 100_000, "lr_decay_unit": "step", "amp": "on",
        "max_step": 200_000, "max_epoch": None,
        "img_w": 1.0, "l1_w": 0.1, "lps_w": 1.0, "rs_w": 1.0, "y_scale": 1.0, "u_scale": 100.0, "v_scale": 100.0,
        "warmup_steps": 0, "ramp_steps": 10_000, "ramp_scaled_by_img_w": False,
        "aug": False, "aug_chain": "stochastic", "aug_prb": 0.5, "plain_ce": True, "aug_strength_ramp": True,
        "aug_start": 5_000, "aug_end": 100_000, "aug_w": 1.0, "augs": "all",
        "aug_resample": True,
        "jnd": 1.0, "flat_w": 1.0,
        "log_every": 50, "val_every": 1_000, "save_every": 1_000,
    },
}

#: The robust recipe as the five shipped models were trained (their cards' commands name it): before perceptual
#: shaping, the flat-weighted loss and the resampling stage (issue 37), with the chain's nine corruptions that 'all'
#: meant then (before 'shift').
RECIPES["robust_v1"] = {**RECIPES["robust"], "jnd": 0.0, "flat_w": 0.0, "aug_resample": False,
                        "augs": "rotation,crop,jitter,gaussian_blur,defocus,perspective,noise,resize,jpeg"}

#: Where a script's original differs from the recipe's common table: the RS scripts validate every 1,000 steps,
#: and train_rs_aug.py has no image-loss ramp (its image losses count fully from step 0).
SCRIPT_OVERRIDES: dict[str, dict[str, dict]] = {
    "original": {"train_rs": {"val_every": 1_000}, "train_rs_aug": {"val_every": 1_000, "ramp_steps": 0}},
    "robust": {},
    "robust_v1": {},
}

#: Flags the original scripts parse but never read: accepted (so old command lines run) and ignored with one
#: warning. Per script, because e.g. --img_start is read by train.py but not by train_rs_aug.py.
_NEVER_READ = ("tensorboard", "l2_loss_scale", "rtt", "jtr", "cc", "blr", "wrp", "reg_start", "reg_w", "rtt_set",
               "wrp_set", "crp_set", "ptb_start", "optim", "detector", "crp_dropout")
UNREAD_FLAGS: dict[str, tuple[str, ...]] = {
    "train": _NEVER_READ + ("std",),
    "train_rs": _NEVER_READ + ("aug", "aug_prb"),
    "train_rs_aug": _NEVER_READ + ("aug", "adv_w", "adv_start", "adv_end", "img_start", "img_end"),
}


def settings(recipe: str, script: str) -> dict:
    """The full table of `recipe` for `script` ('train', 'train_rs' or 'train_rs_aug')."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    return {**RECIPES[recipe], **SCRIPT_OVERRIDES[recipe].get(script, {})}


def describe(dest: str, script: str) -> str:
    """' [original: X; robust: Y; robust_v1: Z]' for a flag's help text."""
    values = [f"{name}: {settings(name, script)[dest]}" for name in RECIPES]
    return " [" + "; ".join(values) + "]"
