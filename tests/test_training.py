"""train.py end to end on CPU at tiny size: files, resumption, weights-only checkpoints, errors, the border."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import train
from engine.evaluation import border_energy_ratio
from models import load_pretrained
from conftest import TINY_TRAIN_FLAGS as TINY



def _run(tmp_path, *extra, name="t"):
    return train.main(["--run_name", name, "--results_dir", str(tmp_path), *TINY, *extra])


def test_train_writes_checkpoint_tensorboard_and_weights_then_resumes(tmp_path, photo_folder, capsys):
    run = tmp_path / "t"
    _run(tmp_path, "--max_step", "4", "--train_path", str(photo_folder))
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert checkpoint["scheduler"]["last_epoch"] == 4
    assert list((run / "tb").glob("events.out.tfevents.*"))
    args = json.loads((run / "args.json").read_text())
    assert args["max_step"] == 4 and "git_commit" in args
    encoder, scanner, config = load_pretrained(run / "model")
    assert config["step"] == 4 and scanner.config.arch == "narrow"
    assert (run / "eval" / "preview.png").is_file()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert 0 <= summary["test_crops"]["acc"] <= 1 and summary["test_crops"]["n"] > 0

    capsys.readouterr()
    _run(tmp_path, "--max_step", "7", "--train_path", str(photo_folder))
    out = capsys.readouterr()
    assert "resuming" in out.out and "at step 4" in out.out
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 7
    assert checkpoint["scheduler"]["last_epoch"] == 7  # the LR schedule continued, not restarted
    adam_steps = {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {7}  # Adam's moments were carried over, not reset
    assert json.loads((run / "args.json").read_text())["resumed_from_step"] == 4

    # The same command again: nothing left to train, the summary is printed again.
    _run(tmp_path, "--max_step", "7", "--train_path", str(photo_folder))
    assert "step 7 of 7" in capsys.readouterr().out
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 7


def test_train_defaults_to_the_scikit_image_photos(tmp_path, capsys):
    _run(tmp_path, "--max_step", "1")
    out = capsys.readouterr().out
    assert "scikit-image sample photos" in out and "astronaut.png" in out


def test_trained_residual_is_not_hidden_at_the_border(tmp_path, photo_folder):
    """The pitfall: on small crops an encoder learns to hide the stamp in a stripe along the border."""
    _run(tmp_path, "--max_step", "60", "--train_path", str(photo_folder), "--lr", "1e-3",
         "--warmup_steps", "0", "--ramp_steps", "60", "--val_every", "60", "--save_every", "60", name="border")
    encoder, _, _ = load_pretrained(tmp_path / "border" / "model")
    x = torch.from_numpy(np.array(Image.open(photo_folder / "im11.png").resize((96, 96)))).permute(2, 0, 1)
    with torch.no_grad():
        residual = encoder(x[None].float() / 255)
    assert residual.abs().mean() > 1e-3  # there is a stamp to look at
    assert border_energy_ratio(residual, band=4).item() < 2.0


def test_missing_train_path_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, "--max_step", "1", "--train_path", str(tmp_path / "nowhere"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "error" in err[0]


def test_bad_flag_values_are_refused_by_name(tmp_path, capsys):
    for flags, name in ((["--max_step", "0"], "--max_step"), (["--lr", "-1"], "--lr"),
                        (["--run_name", "a/b"], "--run_name")):
        with pytest.raises(SystemExit):
            train.main(["--run_name", "x", "--results_dir", str(tmp_path), *TINY, *flags])
        assert name in capsys.readouterr().err


@pytest.mark.parametrize("freeze_step, frozen", [("2", True), ("-1", False)])
def test_batchnorm_statistics_freeze_at_bn_freeze_step(tmp_path, photo_folder, freeze_step, frozen):
    flags = ["--train_path", str(photo_folder), "--bn_freeze_step", freeze_step, "--save_every", "2"]
    _run(tmp_path, "--max_step", "2", *flags)
    before = torch.load(tmp_path / "t" / "checkpoints" / "last.pt", weights_only=True)["scanner"]
    _run(tmp_path, "--max_step", "4", *flags)
    after = torch.load(tmp_path / "t" / "checkpoints" / "last.pt", weights_only=True)["scanner"]
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])  # the scanner still learns
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"]) == frozen


def test_init_from_fine_tunes_from_a_model_at_step_zero(tmp_path, photo_folder, capsys):
    _run(tmp_path, "--max_step", "3", "--train_path", str(photo_folder), name="base")
    base_encoder, base_scanner, _ = load_pretrained(tmp_path / "base" / "model")
    # A different --encoder_width is overridden by the model's architecture; a near-zero LR keeps its weights.
    _run(tmp_path, "--max_step", "1", "--train_path", str(photo_folder), "--init_from", str(tmp_path / "base"),
         "--encoder_width", "0.5", "--lr", "1e-12", "--bn_freeze_step", "0", name="tuned")
    assert "fine-tuning from" in capsys.readouterr().out
    encoder, scanner, config = load_pretrained(tmp_path / "tuned" / "model")
    assert config["step"] == 1 and encoder.config == base_encoder.config
    for tuned, base in ((encoder, base_encoder), (scanner, base_scanner)):
        for (name, a), b in zip(tuned.state_dict().items(), base.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    fresh = train.main(["--run_name", "fresh", "--results_dir", str(tmp_path), *TINY, "--max_step", "1",
                        "--train_path", str(photo_folder), "--lr", "1e-12"])
    fresh_encoder, _, _ = load_pretrained(tmp_path / "fresh" / "model")
    assert not torch.allclose(fresh_encoder.to_residual.weight, base_encoder.to_residual.weight)
