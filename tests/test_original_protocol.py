"""report.original_protocol: the original code's noisy-pass accuracy, its Table 3 attacks and its Table 2 metrics.

Most checks use a stub scanner whose noisy behaviour has a closed form: logits [0, mean(x) − B], so that
P(argmax = STAMPED | x + ε) = Φ((mean(x) − B) / (σ/√d)) exactly (the mean of d i.i.d. N(0, σ²) pixels has std σ/√d),
and whose gradient moves every pixel the same way (FGSM and PGD land on x ∓ ε).
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from skimage.metrics import structural_similarity
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio

import report.original_protocol as op
from models import CLEAN, STAMPED, Scanner, ScannerConfig
from report.attacks import AttackSettings
from report.original_protocol import (ORIGINAL_EPS, ROWS, fgsm_attack, gaussian_noise_attack, noisy_pass_accuracy,
                                      original_attack_table, original_image_quality, original_pgd_step, pgd_attack,
                                      ssim_valid_map)

B = 0.5  # the stub's threshold on the mean pixel value
TOL_SD = 5  # tolerances in binomial standard deviations: a false failure has probability < 1e-5 per comparison


#: Tensors this small gain nothing from a second thread, and on shared cores two threads can be 5× slower.
pytestmark = pytest.mark.usefixtures("one_thread")


class MeanScanner(nn.Module):
    """logits [0, mean(x) − B] per image: STAMPED iff the mean pixel value exceeds B."""

    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.tensor(B))

    def forward(self, x):
        return torch.stack([x.new_zeros(len(x)), x.flatten(1).mean(1) - self.b], 1)


class Recorder(nn.Module):
    """Wraps a scanner and records, per call, the batch size and whether the call came from the noisy-pass score
    (`scoring`, set by the test) and how far its images are from the reference images the test puts in `near`."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []
        self.scoring = None  # the images being scored, set by a spy around noisy_pass_accuracy
        self.near = None  # (K,3,H,W): crafting inputs are compared with these

    def forward(self, x):
        record = {"n": len(x), "scoring": self.scoring is not None}
        with torch.no_grad():
            if self.scoring is not None:
                c = len(self.scoring)  # one chunk: x is k passes of the scored images, pass-major
                noise = x.view(-1, c, *x.shape[1:]) - self.scoring
                record["noise_std"] = float(noise.std())
            elif self.near is not None:
                dist = (x[:, None] - self.near[None]).abs().flatten(2).amax(2)  # L∞ to each reference image
                record["linf"] = float(dist.amin(1).max())
        self.calls.append(record)
        return self.inner(x)


def flat_images(means, size=8, amplitude=0.1, seed=0):
    """Images (N,3,size,size) with exactly the given mean pixel values (float64 means of float32 pixels, up to
    rounding), a zero-mean random pattern of ±amplitude on top."""
    g = torch.Generator().manual_seed(seed)
    pattern = amplitude * (2 * torch.rand(len(means), 3, size, size, generator=g) - 1)
    pattern -= pattern.flatten(1).mean(1).view(-1, 1, 1, 1)
    return (torch.tensor(means, dtype=torch.float32).view(-1, 1, 1, 1) + pattern).float()


def p_right(x, labels, sigma, shift=0.0):
    """Closed-form P(argmax = label) for MeanScanner on x + shift + N(0, σ²) (float64)."""
    d = x[0].numel()
    z = (x.double().flatten(1).mean(1) + shift - B) / (sigma / math.sqrt(d))
    p_stamped = torch.tensor(norm.cdf(z.numpy()))
    return torch.where(labels == STAMPED, p_stamped, 1 - p_stamped)


# --------------------------------------------------------------------------------------- noisy_pass_accuracy
def test_noisy_pass_average_matches_the_closed_form():
    sigma, passes = 0.25, 4000
    sd_mean = sigma / math.sqrt(3 * 8 * 8)
    z = [-1.5, -1.0, -0.5, 0.0, 0.3, 0.8, 1.2, 2.0]
    x = flat_images([B + k * sd_mean for k in z])
    labels = torch.tensor([CLEAN, STAMPED] * 4)
    expected = p_right(x, labels, sigma)
    g = torch.Generator().manual_seed(1)
    out = noisy_pass_accuracy(MeanScanner(), x, labels, sigma, passes=passes, batch_size=1000, generator=g)
    assert out["n"] == 8 and out["passes"] == passes and out["sigma"] == sigma
    assert out["per_image"].shape == (8,) and out["per_image"].dtype == torch.float64
    # per image, a binomial proportion over `passes` independent draws; the mean of 8 independent ones
    per_sd = (expected * (1 - expected) / passes).sqrt()
    assert ((out["per_image"] - expected).abs() <= TOL_SD * per_sd).all(), (out["per_image"], expected)
    mean_sd = float(per_sd.pow(2).sum().sqrt()) / 8
    assert abs(out["acc"] - float(expected.mean())) <= TOL_SD * mean_sd
    assert out["acc"] == pytest.approx(float(out["per_image"].mean()))
    # the same generator seed gives the same numbers, bit for bit
    again = noisy_pass_accuracy(MeanScanner(), x, labels, sigma, passes=passes, batch_size=1000,
                                generator=torch.Generator().manual_seed(1))
    assert torch.equal(again["per_image"], out["per_image"]) and again["acc"] == out["acc"]
    other = noisy_pass_accuracy(MeanScanner(), x, labels, sigma, passes=passes, batch_size=1000,
                                generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other["per_image"], out["per_image"])


def test_noisy_passes_are_chunked_unclamped_and_counted():
    sigma, passes, batch_size = 0.3, 37, 16
    x = flat_images([0.9] * 5 + [0.1] * 6, amplitude=0.09)  # pixels up to 0.99 and down to 0.01
    labels = torch.tensor([STAMPED] * 5 + [CLEAN] * 6)
    rec = Recorder(MeanScanner())
    seen = []
    rec.inner.register_forward_hook(lambda m, args, out: seen.append((args[0].min(), args[0].max())))
    out = noisy_pass_accuracy(rec, x, labels, sigma, passes=passes, batch_size=batch_size,
                              generator=torch.Generator().manual_seed(0))
    sizes = [c["n"] for c in rec.calls]
    assert max(sizes) <= batch_size  # never more than batch_size noisy images at once
    assert sum(sizes) == passes * len(x)  # every image, every pass
    assert min(lo for lo, _ in seen) < 0 and max(hi for _, hi in seen) > 1  # x + ε is not clamped
    assert torch.allclose(out["per_image"] * passes, (out["per_image"] * passes).round(), atol=1e-9)


@pytest.mark.parametrize("sigma", [None, 0, 0.0])
def test_without_noise_it_is_the_plain_argmax_accuracy(sigma):
    x = flat_images([0.6, 0.4, 0.7, 0.45])
    labels = torch.tensor([STAMPED, STAMPED, CLEAN, CLEAN])  # right, wrong, wrong, right
    rec = Recorder(MeanScanner())
    out = noisy_pass_accuracy(rec, x, labels, sigma, passes=1000, batch_size=3)
    assert out["passes"] == 1 and out["sigma"] is None
    assert out["per_image"].tolist() == [1.0, 0.0, 0.0, 1.0] and out["acc"] == 0.5
    assert [c["n"] for c in rec.calls] == [3, 1]


def test_noisy_pass_accuracy_refuses_bad_arguments():
    x, labels = flat_images([0.5, 0.5]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="sigma"):
        noisy_pass_accuracy(MeanScanner(), x, labels, -0.1)
    with pytest.raises(ValueError, match="passes"):
        noisy_pass_accuracy(MeanScanner(), x, labels, 0.1, passes=0)
    with pytest.raises(ValueError, match="labels"):
        noisy_pass_accuracy(MeanScanner(), x, labels[:1], 0.1)


# --------------------------------------------------------------------------------------- the original's attacks
def test_fgsm_moves_every_pixel_by_eps_or_clips():
    eps = 8 / 255
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 7, generator=g)
    x[:, :, 0, :3] = torch.tensor([0.0, 1.0, 0.01])  # pixels the step pushes past 0 or 1
    y = torch.tensor([CLEAN, STAMPED] * 3)
    adv = fgsm_attack(MeanScanner(), x, y, eps, batch_size=4)
    # MeanScanner's cross-entropy rises as the mean moves away from the label's side: +ε for clean, −ε for stamped
    direction = torch.where(y == CLEAN, 1.0, -1.0).view(-1, 1, 1, 1)
    assert torch.allclose(adv, (x + direction * eps).clamp(0, 1), atol=1e-6)
    moved = (adv - x).abs()
    inside = ((x + direction * eps) >= 0) & ((x + direction * eps) <= 1)
    assert torch.allclose(moved[inside], torch.full_like(moved[inside], eps), atol=1e-6)
    assert (~inside).any() and ((adv[~inside] == 0) | (adv[~inside] == 1)).all()


def test_pgd_stays_in_the_ball_and_follows_the_original_steps():
    assert [original_pgd_step(e) * 255 for e in ORIGINAL_EPS] == pytest.approx([1, 1, 2, 4, 6, 8])
    assert original_pgd_step(12 / 255) == pytest.approx(3 / 255)
    eps = 8 / 255
    torch.manual_seed(0)
    scanner = Scanner(ScannerConfig(arch="narrow")).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 24, 24, generator=g)
    y = torch.tensor([CLEAN, STAMPED, CLEAN, STAMPED])
    adv = pgd_attack(scanner, x, y, eps, steps=5, batch_size=3, generator=torch.Generator().manual_seed(1))
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= eps + 1e-6 and (adv != x).any()
    # the random start is uniform in the ball (clipped to [0,1]) and seeded
    start = pgd_attack(scanner, x, y, eps, steps=0, generator=torch.Generator().manual_seed(1))
    again = pgd_attack(scanner, x, y, eps, steps=0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(start, again)
    delta = start - x
    assert delta.abs().max() <= eps + 1e-6 and delta.abs().max() > 0.95 * eps
    assert abs(float(delta.mean())) < 0.05 * eps
    # on the stub every step pushes every pixel the same way: 40 steps of 2/255 end on the corner x ∓ ε
    flat = flat_images([0.5, 0.5, 0.3, 0.7])
    adv = pgd_attack(MeanScanner(), flat, y, eps, generator=torch.Generator().manual_seed(0))
    direction = torch.where(y == CLEAN, 1.0, -1.0).view(-1, 1, 1, 1)
    assert torch.allclose(adv, (flat + direction * eps).clamp(0, 1), atol=1e-6)


def test_noise_row_is_the_originals_gaussian_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g)
    eps = 16 / 255
    noisy = gaussian_noise_attack(x, eps, torch.Generator().manual_seed(3))
    assert torch.equal(noisy, gaussian_noise_attack(x, eps, torch.Generator().manual_seed(3)))
    delta = noisy - x
    assert float(delta.std()) == pytest.approx(eps, rel=0.03)  # N(0, ε²): std ε, not a bound
    assert delta.abs().max() > 2 * eps
    # clamped to [-1, 1], as the original, not to [0, 1]
    big = gaussian_noise_attack(x, 1.0, torch.Generator().manual_seed(3))
    assert big.min() >= -1 and big.max() <= 1 and (big < 0).any() and (big == 1).any() and (big == -1).any()


# --------------------------------------------------------------------------------------- the table
SIGMA, PASSES, EPS = 0.25, 1000, 2 / 255
SETTINGS = AttackSettings(eps=(EPS,), apgd_iters=5, square_queries=30, batch_size=16, noise_batch=512, seed=0)


@pytest.fixture(scope="module")
def table_run():
    """original_attack_table on a recorded MeanScanner, with a spy on the noisy-pass score; 8 + 8 images whose
    base margins are below ε (so that every attack can turn the base scanner) but comparable to the noise."""
    d = 3 * 16 * 16
    sd_mean = SIGMA / math.sqrt(d)
    margins = [k * sd_mean for k in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)]  # all < ε = 0.87 sd_mean
    assert max(margins) < EPS
    clean = flat_images([B - m for m in margins], size=16, seed=1)
    stamped = flat_images([B + m for m in margins], size=16, seed=2)
    x = torch.cat([clean, stamped])
    rec = Recorder(MeanScanner())
    rec.near = x
    scored = []
    real = op.noisy_pass_accuracy

    def spy(scanner, images, labels, sigma, passes, batch_size, generator):
        scored.append({"images": images.clone(), "labels": labels.clone(), "sigma": sigma, "passes": passes,
                       "first_call": len(rec.calls)})
        rec.scoring = images
        try:
            return real(scanner, images, labels, sigma, passes, batch_size, generator)
        finally:
            rec.scoring = None

    mp = pytest.MonkeyPatch()
    mp.setattr(op, "noisy_pass_accuracy", spy)
    try:
        table = original_attack_table(rec, clean, stamped, SIGMA, eps=(EPS,), settings=SETTINGS, passes=PASSES,
                                      attacks=("fgsm", "pgd-40", "apgd-ce", "square", "adaptive"))
    finally:
        mp.undo()
    return table, rec, scored, x


def test_table_attacks_the_base_scanner_and_scores_with_noise(table_run):
    table, rec, scored, x = table_run
    n = len(x)
    # crafting (every call outside the score) only ever saw images within ε of the originals: no noise, no EOT
    crafting = [c for c in rec.calls if not c["scoring"]]
    assert crafting and max(c["linf"] for c in crafting) <= EPS + 1e-6
    # one score per row and the unattacked images, each on `passes` noisy copies of every image
    assert len(scored) == 5 + 1
    assert all(s["sigma"] == SIGMA and s["passes"] == PASSES for s in scored)
    scoring = [c for c in rec.calls if c["scoring"]]
    assert sum(c["n"] for c in scoring) == len(scored) * PASSES * n
    assert all(c["noise_std"] == pytest.approx(SIGMA, rel=0.05) for c in scoring)
    # ... of the crafted images: FGSM's are x ∓ ε, the others within ε and changed, the last one the originals
    by_row = dict(zip(("fgsm", "pgd-40", "apgd-ce", "square", "adaptive", None), scored))
    y = by_row[None]["labels"]
    direction = torch.where(y == CLEAN, 1.0, -1.0).view(-1, 1, 1, 1)
    assert torch.allclose(by_row["fgsm"]["images"], x + direction * EPS, atol=1e-6)
    assert torch.equal(by_row[None]["images"], x)
    for name in ("pgd-40", "apgd-ce", "square"):
        delta = by_row[name]["images"] - x
        assert delta.abs().max() <= EPS + 1e-6 and (delta != 0).flatten(1).any(1).any(), name
    # adaptive: Square's image where Square turned the base scanner, APGD-CE's elsewhere
    square, apgd = by_row["square"]["images"], by_row["apgd-ce"]["images"]
    turned = MeanScanner()(square).argmax(1) != y
    expected = torch.where(turned.view(-1, 1, 1, 1), square, apgd)
    assert torch.equal(by_row["adaptive"]["images"], expected)


def test_table_numbers_are_the_noisy_pass_average(table_run):
    table, rec, scored, x = table_run
    n = len(x)
    y = scored[-1]["labels"]
    label = f"{EPS * 255:g}/255"
    assert table["protocol"] == "original" and table["sigma"] == SIGMA and table["passes"] == PASSES
    assert table["n_clean"] == 8 and table["n_stamped"] == 8 and table["eps"] == [EPS]
    assert set(table["attacks"]) == {"fgsm", "pgd-40", "apgd-ce", "square", "adaptive"}
    assert table["settings"]["pgd_step"] == {label: pytest.approx(1 / 255)} and table["settings"]["pgd_steps"] == 40

    def within(row, shift):
        expected = p_right(x, y, SIGMA, shift)
        sd = (expected * (1 - expected) / PASSES).sqrt()
        for part, mask in (("acc_clean", y == CLEAN), ("acc_stamped", y == STAMPED), ("acc", y >= 0)):
            tol = TOL_SD * float(sd[mask].pow(2).sum().sqrt()) / int(mask.sum())
            assert abs(row[part] - float(expected[mask].mean())) <= tol, (part, row[part], expected[mask].mean())

    # no attack: Φ(margin / (σ/√d)); the base scanner is right on every image
    within(table["no_attack"], 0.0)
    assert table["no_attack"]["base_acc"] == 1.0
    # FGSM and PGD-40 land on x ∓ ε: the base scanner is wrong on every image, the noisy score is Φ of the shifted
    # margin, far from 0: the number in the table is the noisy-pass average, not the base verdict
    direction = torch.where(y == CLEAN, 1.0, -1.0).view(-1, 1, 1, 1)
    for name in ("fgsm", "pgd-40"):
        row = table["attacks"][name][label]
        assert row["base_acc"] == 0.0 and row["eps"] == EPS and row["seconds"] >= 0
        expected = p_right(x + direction * EPS, y, SIGMA)
        sd = (expected * (1 - expected) / PASSES).sqrt()
        assert abs(row["acc"] - float(expected.mean())) <= TOL_SD * float(sd.pow(2).sum().sqrt()) / n
        assert row["acc"] > 0.2
    for name in ("apgd-ce", "square", "adaptive"):
        row = table["attacks"][name][label]
        assert set(row) == {"eps", "acc_clean", "acc_stamped", "acc", "base_acc", "seconds"}
        assert 0 <= row["acc"] <= 1 and row["acc"] == pytest.approx((row["acc_clean"] + row["acc_stamped"]) / 2)


def test_table_without_sigma_scores_the_plain_argmax_and_checks_its_input():
    clean = flat_images([0.45, 0.49], size=12)
    stamped = flat_images([0.51, 0.6], size=12)
    settings = AttackSettings(eps=(EPS,), apgd_iters=3, square_queries=10, batch_size=4, noise_batch=64)
    table = original_attack_table(MeanScanner(), clean, stamped, None, eps=(0.0, 4 / 255), settings=settings,
                                  attacks=("noise", "fgsm"))
    assert table["passes"] == 1 and table["sigma"] is None
    assert set(table["attacks"]) == {"noise", "fgsm"} and set(table["attacks"]["fgsm"]) == {"0/255", "4/255"}
    assert table["no_attack"]["acc"] == 1.0 and table["attacks"]["fgsm"]["0/255"]["acc"] == 1.0
    # at 4/255 FGSM turns the two images whose margin is below ε: accuracy 2/4, the same as the base verdict
    row = table["attacks"]["fgsm"]["4/255"]
    assert row["acc"] == row["base_acc"] == 0.5 and row["acc_clean"] == 0.5 and row["acc_stamped"] == 0.5
    with pytest.raises(ValueError, match="unknown attacks"):
        original_attack_table(MeanScanner(), clean, stamped, None, attacks=("apgd-eot",))
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        original_attack_table(MeanScanner(), clean, stamped + 0.5, None)
    assert ROWS == ("noise", "fgsm", "pgd-40", "apgd-ce", "square", "adaptive")


# --------------------------------------------------------------------------------------- Table 2
class Residual(nn.Module):
    """An 'encoder' whose residual is fn(x)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_quality_constant_residual_gives_exact_psnr_per_batch():
    c = 0.1
    g = torch.Generator().manual_seed(0)
    x = 0.8 + 0.2 * torch.rand(10, 3, 16, 13, generator=g)  # x + c leaves [0,1] on half of the pixels
    loader = list(x.split(3))  # the loader's batches (3) are not the metric's (4)
    out = original_image_quality(Residual(lambda t: torch.full_like(t, c)), loader, "cpu", batch_size=4)
    assert out["n_batches"] == 3 and out["n_images"] == 10 and out["batch_size"] == 4
    assert out["psnr"]["per_batch"] == pytest.approx([-10 * math.log10(c ** 2)] * 3, abs=1e-4)
    assert out["psnr"]["mean"] == pytest.approx(20.0, abs=1e-4) and out["psnr"]["std"] == pytest.approx(0, abs=1e-4)
    assert out["lpips"] is None
    dropped = original_image_quality(Residual(lambda t: torch.full_like(t, c)), loader, "cpu", batch_size=4,
                                     drop_last=True)
    assert dropped["n_batches"] == 2 and dropped["n_images"] == 8
    # the strict protocol's per-image PSNR of the clamped stamp is higher: clamping removes part of the residual
    clamped = peak_signal_noise_ratio((x + c).clamp(0, 1), x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert (x + c > 1).any() and float(clamped.mean()) > out["psnr"]["mean"] + 1.5


def test_quality_is_per_batch_mse_and_valid_ssim_and_batch_mean_lpips():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(7, 3, 24, 20, generator=g)
    scale = torch.linspace(0.02, 0.2, 7).view(-1, 1, 1, 1)
    encoder = Residual(lambda t: scale * (t - 0.5))
    calls = []

    def fake_lpips(a, b, normalize=False):
        calls.append((normalize, float(a.max()), float(a.min())))
        return (a - b).abs().mean((1, 2, 3)).view(-1, 1, 1, 1)

    # one loader batch of all 7 photos, so that the encoder sees them together; metric batches of 3, 3, 1
    out = original_image_quality(encoder, [x], "cpu", batch_size=3, lpips_model=fake_lpips)
    stamped = x + scale * (x - 0.5)
    assert out["n_batches"] == 3 and out["n_images"] == 7
    groups = [slice(0, 3), slice(3, 6), slice(6, 7)]
    mse = [float(((stamped[s].double() - x[s].double()) ** 2).mean()) for s in groups]
    assert out["psnr"]["per_batch"] == pytest.approx([10 * math.log10(1 / m) for m in mse], abs=1e-4)
    per_image = peak_signal_noise_ratio(stamped[:3], x[:3], data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert abs(out["psnr"]["per_batch"][0] - float(per_image.mean())) > 0.1  # not the mean of per-image PSNRs
    per_batch = torch.tensor(out["psnr"]["per_batch"], dtype=torch.float64)
    assert out["psnr"]["std"] == pytest.approx(float(per_batch.std(correction=0)))  # np.std: population
    # SSIM: scikit-image's Gaussian SSIM (its border cropped: no padding), averaged over the batch's photos
    ref = [float(np.mean([structural_similarity(stamped[i].double().numpy(), x[i].double().numpy(), channel_axis=0,
                                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                data_range=1.0) for i in range(s.start, s.stop)])) for s in groups]
    assert out["ssim"]["per_batch"] == pytest.approx(ref, abs=1e-5)
    # LPIPS: the unclamped stamp, normalize=True (the original's ×2 − 1), the mean over each batch
    assert calls and all(normalize for normalize, _, _ in calls) and max(hi for _, hi, _ in calls) > 1
    lp = (stamped - x).abs().mean((1, 2, 3)).double()
    assert out["lpips"]["per_batch"] == pytest.approx([float(lp[s].mean()) for s in groups], abs=1e-7)


def test_ssim_valid_map_matches_torchmetrics_full_map_without_its_border():
    from torchmetrics.functional.image import structural_similarity_index_measure
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 3, 23, 19, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim_valid_map(a, b)
    assert ours.shape == (2, 3, 13, 9)
    _, full = structural_similarity_index_measure(a, b, data_range=1.0, return_full_image=True)
    assert torch.allclose(ours, full[..., 5:-5, 5:-5], atol=1e-10)
