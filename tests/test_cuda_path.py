"""The CUDA code paths, shown on CPU where CPU can show them: resuming into fp16 or fused Adam, the GPU of a
LOCAL_RANK, bf16 only where native, fp32 judging inside autocast, the noise generator's device, DataLoader
workers, the CUDA RNG note, Smooth's chunks, a loss term that joins mid-interval, and host-device
synchronisations per training step (engine.hostsync's CPU simulation)."""
import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench
import engine.device
import engine.distributed
import engine.training
import scan
import train_rs_aug
from conftest import TINY_TRAIN_FLAGS as TINY, cli
from engine.device import amp_dtype, constant, set_rng_state
from engine.evaluation import stamp_and_scan
from engine.hostsync import HostSyncCounter, optimizer_host_tensors
from engine.training import (Trainer, _nonfinite, default_workers, load_optimizer_state, load_scaler_state)
from models import Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, save_pretrained
from report.judge import Judge
from smoothing import Smooth
from smoothing.certify import stamp
from smoothing.core import chunk_size


# ------------------------------------------------------------------------------------------------ resuming
def test_an_empty_loss_scale_resumes_into_an_fp16_scaler():
    """A checkpoint written on CPU, with bf16 or --amp off holds scaler state {}: an enabled scaler (fp16 on CUDA;
    here the CPU one, enabled as well) starts afresh instead of raising."""
    with pytest.raises(RuntimeError, match="state dict is empty"):
        torch.amp.GradScaler("cpu").load_state_dict({})  # what Trainer.load did
    scaler, notes = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), []
    load_scaler_state(scaler, {}, notes.append)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 10 and "loss scale starts afresh" in notes[0]
    saved = torch.amp.GradScaler("cpu", init_scale=8.0).state_dict()
    load_scaler_state(scaler, saved, notes.append)
    assert scaler.get_scale() == 8.0 and len(notes) == 1
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler_state(disabled, saved, notes.append)  # a disabled scaler ignores any state, silently
    assert len(notes) == 1


def _adam_state(fused: bool):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    opt = torch.optim.Adam(params, lr=0.1, fused=fused)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    return params, opt


@pytest.mark.parametrize("saved_fused, built_fused", [(False, True), (True, False)])
def test_a_resumed_optimizer_keeps_the_options_it_was_built_with(saved_fused, built_fused):
    """A CPU checkpoint (unfused Adam) resumed into fused Adam (CUDA) stays fused, with float32 step counts on the
    parameters' device; and the other way round. torch's load_state_dict alone takes the saved options."""
    params, saved = _adam_state(saved_fused)
    state = copy.deepcopy(saved.state_dict())  # as read from a file: no tensor shared with `saved`
    plain = torch.optim.Adam([nn.Parameter(p.detach().clone()) for p in params], lr=0.1, fused=built_fused)
    plain.load_state_dict(copy.deepcopy(state))
    assert plain.param_groups[0]["fused"] == saved_fused  # the options come from the checkpoint

    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = torch.optim.Adam(resumed_params, lr=0.1, fused=built_fused)
    load_optimizer_state(resumed, state)
    group = resumed.param_groups[0]
    assert group["fused"] == built_fused and group["lr"] == 0.1
    for p in resumed_params:
        step = resumed.state[p]["step"]
        assert int(step) == 2 and step.device == p.device and step.dtype == torch.float32
    for opt, ps in ((saved, params), (resumed, resumed_params)):  # the resumed one continues as the saved one
        for p in ps:
            p.grad = torch.full_like(p, 0.5)
        opt.step()
    for a, b in zip(params, resumed_params):
        assert torch.allclose(a, b, atol=1e-6)


def test_trainer_resumes_a_cpu_checkpoint_into_an_fp16_scaler_and_fused_adam(monkeypatch):
    """What resuming a CPU run with --device cuda (fp16 GPU) meets, with CPU stand-ins: an enabled GradScaler and
    fused Adam."""
    _, args, views = importlib.import_module("train").parse(TINY_NETS)
    torch.manual_seed(0)
    cpu_run = Trainer(args, views, torch.device("cpu"), log=lambda *a: None)
    cpu_run.step(torch.rand(2, 3, 32, 32), 0)
    state = copy.deepcopy(cpu_run.state(1))
    assert state["scaler"] == {} and not state["optimizer"]["param_groups"][0]["fused"]
    real_adam, real_scaler = torch.optim.Adam, torch.amp.GradScaler
    monkeypatch.setattr(torch.optim, "Adam", lambda *a, **k: real_adam(*a, **{**k, "fused": True}))
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real_scaler("cpu"))
    notes = []
    resumed = Trainer(args, views, torch.device("cpu"), checkpoint=state, log=notes.append)
    assert resumed.scaler.is_enabled() and any("loss scale starts afresh" in note for note in notes)
    assert all(group["fused"] for group in resumed.optimizer.param_groups)
    steps = {int(s["step"]) for s in resumed.optimizer.state.values()}
    assert steps == {1}


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("visible, local_rank, index", [(4, 3, 3), (1, 3, 0), (2, 3, 1)])
def test_local_rank_maps_onto_the_visible_gpus(monkeypatch, visible, local_rank, index):
    """One GPU visible per process (SLURM --gpus-per-task=1): every LOCAL_RANK drives cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(engine.distributed.dist, "is_initialized", lambda: True)  # no process group here
    for name, value in (("RANK", local_rank), ("WORLD_SIZE", 4), ("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", 4)):
        monkeypatch.setenv(name, str(value))
    d, device = engine.distributed.setup("auto")
    assert device == torch.device("cuda", index) and chosen == [device] and d.local_rank == local_rank


def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    """Below compute capability 8 torch.cuda.is_bf16_supported() counts emulation; cuDNN has no bf16 convolutions
    there, so AMP must be fp16."""
    for native in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or native)
        assert amp_dtype(torch.device("cuda")) == (torch.bfloat16 if native else torch.float16)
    assert amp_dtype(torch.device("cpu")) is None


def test_dataloader_workers_scale_with_the_cores_per_process(monkeypatch):
    monkeypatch.setattr(engine.training.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    for local_world, workers in ((None, 8), ("2", 8), ("8", 4), ("64", 1)):
        if local_world is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        assert default_workers(torch.device("cuda")) == workers
    assert default_workers(torch.device("cpu")) == 0


def test_cuda_rng_not_restored_on_another_gpu_count_warns_once(monkeypatch):
    monkeypatch.setattr(engine.device, "_warned_cuda_rng", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = {"cpu": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)]}
    with pytest.warns(UserWarning, match="1 GPU.*sees 2.*not restored"):
        set_rng_state(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_rng_state(state)  # once per process
    set_rng_state({**state, "cuda": state["cuda"] * 2})
    assert len(restored) == 1


def test_device_constants_are_made_once():
    a = constant(((1.0, 2.0),), torch.device("cpu"), torch.float32)
    assert a is constant(((1.0, 2.0),), torch.device("cpu"), torch.float32)
    assert constant(((1.0, 2.0),), torch.device("cpu"), torch.float64).dtype == torch.float64


# ------------------------------------------------------------------------------------------------ fp32 judging
class _TinyConv(nn.Module):
    """A conv net whose bf16 result differs visibly from its fp32 one."""

    def __init__(self, out: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, out)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.head(y.mean((2, 3))) if self.head.out_features == 2 else 0.05 * torch.tanh(y[:, :3])


def _judged(x):
    scanner, encoder = _TinyConv(2).eval(), _TinyConv(3).eval()
    _, plain = Judge(scanner, batch_size=3)(x)
    out = stamp_and_scan(encoder, scanner, x)
    stamped = stamp(encoder, x)
    counts = Smooth(scanner, 0.25).counts(x[0], 64, 16, torch.Generator().manual_seed(0))
    return plain, out["clean_logits"], out["stamped_logits"], out["residual"], stamped, counts


def test_judging_stamping_and_smoothing_run_in_fp32_inside_autocast():
    """A caller's autocast (here CPU bf16; on CUDA the training loop's) must not change scores against a threshold
    calibrated elsewhere: the plain judge, stamp-and-scan, stamping and Smooth run in fp32 on every device."""
    x = torch.rand(5, 3, 24, 24)
    reference = _judged(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # nested, as a caller inside the training loop would be
            inside = _judged(x)
        assert F.conv2d(x, torch.ones(8, 3, 3, 3)).dtype == torch.bfloat16  # the autocast is real
    for a, b in zip(reference, inside):
        assert a.dtype == b.dtype and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ scan --certify
def test_scan_certify_draws_its_noise_on_the_scanners_device(tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_pretrained(tmp_path / "m", StampEncoder(StampEncoderConfig(width=0.25)), Scanner(ScannerConfig("narrow")),
                    extra={"sigma": 0.25})
    real, made = torch.Generator, []

    def generator(*args, **kwargs):
        made.append(kwargs.get("device", args[0] if args else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "Generator", generator)
    args = scan.build_parser().parse_args(["--model", str(tmp_path / "m"), "x.png", "--certify", "--device", "cpu"])
    scanner = scan.PhotoScanner(args, log=lambda *a: None)
    assert scanner.certify_generator is not None and len(made) >= 2
    assert all(device is not None and torch.device(device) == scanner.device for device in made)


# ------------------------------------------------------------------------------------------------ Smooth's chunks
def test_smooth_chunks_by_pixels_on_every_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert chunk_size(cpu, 400, 400) == 8 and chunk_size(gpu, 400, 400) == 64
    assert chunk_size(gpu, 1000, 750) == 13 and chunk_size(gpu, 4000, 3000) == 1  # never the whole batch of 400


# ------------------------------------------------------------------------------------------------ the loop
def test_nonfinite_names_the_term_when_the_terms_change_within_an_interval():
    finite = [(["L_A/noisy", "loss/total"], torch.tensor([True, True])),
              (["L_A/aug", "L_A/noisy", "loss/total"], torch.tensor([True, True, True])),
              (["L_A/aug", "L_A/noisy", "loss/total"], torch.tensor([False, True, False]))]
    assert _nonfinite(finite, 10, 13, {}, False) == "non-finite L_A/aug, loss/total at step 13"


def test_a_non_finite_step_after_aug_start_is_named(tmp_path, photo_folder, monkeypatch, capsys):
    """The augmented view joins at step 4 (--aug_start 2: weight 0 at step 2, ½ at step 3), inside the log interval
    of steps 1–5; step 3's loss is NaN. The run stops naming it (it used to fail stacking the per-step flags)."""
    real, calls = engine.training.residual_regularisation, []

    def faulty(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(engine.training, "residual_regularisation", faulty)
    code, _, err = cli(train_rs_aug, ["--run_name", "nan", "--results_dir", tmp_path, "--train_path", photo_folder,
                                      *TINY, "--max_step", "6", "--log_every", "5", "--save_every", "1000",
                                      "--val_every", "1000", "--aug_start", "2", "--aug_end", "4"], capsys)
    assert code == 2 and "non-finite loss/L_rr, loss/total at step 3" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ host syncs
TINY_NETS = ["--encoder", "unet", "--encoder_width", "0.25", "--scanner", "narrow", "--image_size", "32",
             "--batch_size", "2", "--lps_w", "0", "--device", "cpu", "--run_name", "sync"]


def _syncs_per_step(script, *flags):
    _, args, views = importlib.import_module(script).parse([*TINY_NETS, *flags])
    torch.manual_seed(0)
    trainer = Trainer(args, views, torch.device("cpu"), log=lambda *a: None)
    x = torch.rand(2, 3, 32, 32)
    for step in range(2):  # the first steps make the optimiser's state and the cached constants
        trainer.step(x, step)
    with HostSyncCounter("cpu", host=optimizer_host_tensors(trainer.optimizer)) as counter:
        for step in range(2, 4):
            terms = trainer.step(x, step)
            torch.stack([torch.as_tensor(terms[k]).isfinite() for k in sorted(terms)])  # the loop's bookkeeping
    return counter


@pytest.mark.parametrize("script", ["train", "train_rs"])
@pytest.mark.parametrize("recipe", ["original", "robust"])
def test_plain_and_noisy_training_steps_make_no_host_device_syncs(script, recipe):
    """Was 3 per step: the YUV weights' new_tensor and kornia's rgb_to_yuv building its matrix, twice."""
    counter = _syncs_per_step(script, "--recipe", recipe)
    assert counter.total == 0, counter.report()


@pytest.mark.parametrize("recipe", ["original", "robust"])
def test_the_augmented_step_syncs_only_in_kornias_jpeg(recipe):
    """train_rs_aug.py with every corruption at full strength: 2 host reads per step, both kornia's (its
    differentiable JPEG checks the quality range with amin().item() and amax().item(); only torch.compile skips
    that). Was 13 (robust) and 18 (original) per step."""
    counter = _syncs_per_step("train_rs_aug", "--recipe", recipe, "--aug_start", "0", "--aug_end", "0",
                              "--aug_prb", "1")
    assert dict(counter.counts) == {"read": 4}, counter.report()  # 2 steps
    assert all("kornia/enhance/jpeg.py" in site for _, site in counter.sites), counter.report()


def test_the_counter_tells_device_literals_and_reads_from_host_ones():
    x = torch.rand(2, 3)
    with HostSyncCounter("cpu") as counter:
        x.new_tensor([1.0, 2.0])  # literal for the device
        torch.tensor([1.0], device=x.device)  # literal for the device
        torch.as_tensor(0.5, device=x.device)  # literal for the device
        x.sum().item()  # read of a device value
        host = torch.tensor([3.0])  # on the host by design
        bool((host > 0).all())
        float(torch.rand(()))  # a CPU coin flip
        torch.as_tensor(x, device=x.device)  # no copy
        x * 2.0 + torch.full((3,), 3.0, device=x.device)  # Python scalars and factories: no copy
    assert dict(counter.counts) == {"literal": 3, "read": 1}, counter.report()


def test_bench_before_is_torchs_defaults_and_its_help_names_no_issue(capsys):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with bench.speed_features(torch.device("cuda"), False):
        assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.benchmark
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == saved
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "issue" not in capsys.readouterr().out.lower()
