"""report.attacks: pyautoattack on the scanner (Table 3), forgery/removal success, the smoothed verdict."""
import copy
import json

import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from models import CLEAN, STAMPED, Scanner, ScannerConfig
import report.attacks
from report.attacks import ATTACKS, AttackSettings, NoisyScanner, attack, eps_label, robustness_table
from smoothing import ABSTAIN

SIZE = 32
SIGMA = 0.05
#: few enough iterations, queries and samples that each table takes a second or two
QUICK = AttackSettings.quick(eps=(1 / 255, 2 / 255, 8 / 255), apgd_iters=5, square_queries=40, smooth_n=32,
                             noise_batch=32)


def photos(n: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random 'photos' (n,3,SIZE,SIZE), with a saturated corner so that clamping to [0,1] matters."""
    x = nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=generator), size=SIZE, mode="bilinear")
    x[:, :, :6, :6] = (x[:, :, :6, :6] > 0.5).float()
    return x


#: Tensors this small gain nothing from a second thread, and on shared cores two threads can be 5× slower.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    """A narrow scanner trained for a few seconds to tell photos from photos + a fixed ±0.08 pattern, with and
    without noise of std SIGMA (so that its smoothed version works too), and 5 + 5 held-out images."""
    g = torch.Generator().manual_seed(0)
    pattern = 0.08 * torch.sign(torch.randn(1, 3, SIZE, SIZE, generator=g))
    stamp = lambda x: (x + pattern).clamp(0, 1)  # noqa: E731
    torch.manual_seed(0)
    scanner = Scanner(ScannerConfig(arch="narrow"))
    opt = torch.optim.Adam(scanner.parameters(), lr=1e-3)
    y = torch.tensor([CLEAN] * 8 + [STAMPED] * 8)
    for _ in range(80):
        clean = photos(8, g)
        x = torch.cat([clean, stamp(clean)])
        x = x + SIGMA * torch.randn_like(x) * (torch.rand(len(x), 1, 1, 1) < 0.5)
        loss = nn.functional.cross_entropy(scanner(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scanner.eval()
    clean = photos(5, g)
    return scanner, clean, stamp(clean)


@pytest.fixture(scope="module")
def plain_table(data):
    scanner, clean, stamped = data
    return robustness_table(scanner, clean, stamped, QUICK)


@pytest.fixture(scope="module")
def smoothed_table(data):
    scanner, clean, stamped = data
    return robustness_table(scanner, clean, stamped, QUICK, sigma=SIGMA)


def labelled(data):
    scanner, clean, stamped = data
    return torch.cat([clean, stamped]), torch.tensor([CLEAN] * len(clean) + [STAMPED] * len(stamped))


def test_the_fixture_scanner_works(data):
    scanner, clean, stamped = data
    x, y = labelled(data)
    with torch.no_grad():
        assert (scanner(x).argmax(1) == y).float().mean() >= 0.8


@pytest.mark.parametrize("name", ATTACKS)
def test_eps_zero_changes_nothing_and_runs_nothing(data, name, monkeypatch):
    scanner, _, _ = data
    x, y = labelled(data)

    def no_run(*args, **kwargs):
        raise AssertionError("pyautoattack ran at eps 0")

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", no_run)
    x_adv = attack(NoisyScanner(scanner, SIGMA) if name == "apgd-eot" else scanner, x, y, 0.0, name, QUICK)
    assert torch.equal(x_adv, x) and x_adv is not x
    table = robustness_table(scanner, x[y == CLEAN], x[y == STAMPED], AttackSettings.quick(eps=(0.0,)))
    for rows in table["attacks"].values():
        row = rows[eps_label(0.0)]
        assert {k: row[k] for k in table["no_attack"]} == table["no_attack"]
        assert row["n_forged"] == row["n_removed"] == 0


@pytest.mark.parametrize("name", ATTACKS)
def test_adversarial_images_stay_in_the_eps_ball_and_in_range(data, name):
    scanner, _, _ = data
    x, y = labelled(data)
    eps = 16 / 255
    model = NoisyScanner(scanner, SIGMA) if name == "apgd-eot" else scanner
    x_adv = attack(model, x, y, eps, name, AttackSettings.quick(apgd_iters=5, square_queries=200))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    changed = (x_adv != x).flatten(1).any(1)
    assert changed.any(), "the attack turned no image at 16/255"
    if name != "apgd-eot":  # a deterministic model: the images pyautoattack kept are misclassified
        with torch.no_grad():
            assert (scanner(x_adv[changed]).argmax(1) != y[changed]).all()


def test_attack_is_reproducible_and_leaves_the_callers_generator_alone(data):
    scanner, _, _ = data
    x, y = labelled(data)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = attack(NoisyScanner(scanner, SIGMA), x, y, 4 / 255, "apgd-eot", QUICK)
    assert torch.equal(torch.rand(3), expected_next)
    second = attack(NoisyScanner(scanner, SIGMA), x, y, 4 / 255, "apgd-eot", QUICK)
    assert torch.equal(first, second)
    other_seed = attack(NoisyScanner(scanner, SIGMA), x, y, 4 / 255, "apgd-eot",
                        AttackSettings.quick(apgd_iters=5, seed=1))
    assert not torch.equal(first, other_seed)


def test_attack_runs_in_eval_mode_and_restores_every_modules_mode(data):
    scanner = copy.deepcopy(data[0]).train()
    scanner.bn1.eval()  # e.g. a BatchNorm frozen during training
    before = {k: v.clone() for k, v in scanner.state_dict().items()}
    x, y = labelled(data)
    attack(NoisyScanner(scanner, SIGMA), x, y, 4 / 255, "apgd-eot", QUICK)
    # eval mode inside: no BatchNorm running statistic moved
    assert all(torch.equal(before[k], v) for k, v in scanner.state_dict().items())
    assert scanner.training and scanner.layer1.training and not scanner.bn1.training


def test_attack_settings_reach_pyautoattack(data, monkeypatch):
    """Iterations, restarts, EOT and queries as set, not pyautoattack's custom defaults (5 restarts, 100 iters,
    5000 queries); the step-size schedule follows the iterations."""
    import pyautoattack.autopgd_base as apgd_module
    import pyautoattack.square as square_module
    seen = {}
    real_apgd, real_square = apgd_module.APGDAttack.perturb, square_module.SquareAttack.perturb

    def spy_apgd(self, x, y=None, **kwargs):
        seen["apgd"] = (self.n_iter, self.n_restarts, self.eot_iter, self.n_iter_2, self.eps, self.seed)
        return real_apgd(self, x, y, **kwargs)

    def spy_square(self, x, y=None):
        seen["square"] = (self.n_queries, self.n_restarts, self.eps, self.seed)
        return real_square(self, x, y)

    monkeypatch.setattr(apgd_module.APGDAttack, "perturb", spy_apgd)
    monkeypatch.setattr(square_module.SquareAttack, "perturb", spy_square)
    scanner, _, _ = data
    x, y = labelled(data)
    settings = AttackSettings.quick(apgd_iters=7, square_queries=11, eot_iter=3, n_restarts=2, seed=5)
    attack(NoisyScanner(scanner, SIGMA), x, y, 4 / 255, "apgd-eot", settings)
    assert seen["apgd"] == (7, 2, 3, max(int(0.22 * 7), 1), 4 / 255, 5)
    attack(scanner, x, y, 4 / 255, "apgd-ce", settings)
    assert seen["apgd"][2] == 1
    attack(scanner, x, y, 4 / 255, "square", settings)
    assert seen["square"] == (11, 2, 4 / 255, 5)
    assert AttackSettings().apgd_iters == 100 and AttackSettings().square_queries == 5000
    assert AttackSettings().n_restarts == 1 and AttackSettings().eot_iter == 20


def test_attack_only_attacks_what_the_judge_gets_right(data):
    scanner, clean, _ = data
    y = torch.full((len(clean),), CLEAN)
    says_stamped = lambda images: torch.tensor([[0.0, 1.0]]).repeat(len(images), 1)  # noqa: E731
    assert torch.equal(attack(scanner, clean, y, 8 / 255, "apgd-ce", QUICK, judge=says_stamped), clean)


def test_attack_refuses_bad_input(data):
    scanner, _, _ = data
    x, y = labelled(data)
    with pytest.raises(ValueError, match="unknown attack 'apgd-dlr'"):
        attack(scanner, x, y, 8 / 255, "apgd-dlr", QUICK)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        attack(scanner, x * 255, y, 8 / 255, "apgd-ce", QUICK)
    with pytest.raises(ValueError, match="eps"):
        attack(scanner, x, y, -0.1, "apgd-ce", QUICK)
    with pytest.raises(ValueError, match="n_restarts"):
        AttackSettings(n_restarts=0)


def test_plain_table_accuracy_never_rises_with_eps(plain_table):
    table = plain_table
    assert set(table["attacks"]) == {"apgd-ce", "square", "adaptive"}
    for name, rows in table["attacks"].items():
        assert list(rows) == [eps_label(e) for e in QUICK.eps]
        previous = table["no_attack"]
        for row in rows.values():
            for key in ("acc_clean", "acc_stamped", "acc"):
                assert row[key] <= previous[key], (name, row["eps"], key)
            previous = row
    # the attack does something: APGD at 8/255 beats this barely trained scanner
    assert table["attacks"]["apgd-ce"][eps_label(8 / 255)]["acc"] < table["no_attack"]["acc"]


def test_adaptive_is_the_worst_case_of_its_parts(plain_table, smoothed_table):
    for table, parts in ((plain_table, ("apgd-ce", "square")), (smoothed_table, ("apgd-eot", "square"))):
        for label, row in table["attacks"]["adaptive"].items():
            for part in parts:
                assert row["acc"] <= table["attacks"][part][label]["acc"]
                assert row["n_forged"] >= table["attacks"][part][label]["n_forged"]
                assert row["n_removed"] >= table["attacks"][part][label]["n_removed"]


def test_forgery_and_removal_match_the_accuracies_of_a_plain_scanner(plain_table):
    table = plain_table
    n_clean, n_stamped = table["n_clean"], table["n_stamped"]
    read_clean = round(table["no_attack"]["acc_clean"] * n_clean)
    read_stamped = round(table["no_attack"]["acc_stamped"] * n_stamped)
    for rows in table["attacks"].values():
        for row in rows.values():
            assert 0 <= row["forgery_success"] <= 1 and 0 <= row["removal_success"] <= 1
            assert row["forgery_success"] == pytest.approx(row["n_forged"] / read_clean)
            assert row["removal_success"] == pytest.approx(row["n_removed"] / read_stamped)
            # two classes, no abstention: every clean image read as clean before and not after was forged
            assert round(row["acc_clean"] * n_clean) == read_clean - row["n_forged"]
            assert round(row["acc_stamped"] * n_stamped) == read_stamped - row["n_removed"]
            assert row["abstain"] == 0


def test_forgery_and_removal_count_only_photos_read_right_without_attack():
    """Hand-made verdicts: a clean photo already read as stamped (or abstained on) before the attack is no forgery
    target, a stamped one read as clean no removal target; abstentions count as wrong and as neither."""
    from report.attacks import _row
    c, s, a = CLEAN, STAMPED, ABSTAIN
    y = torch.tensor([c, c, c, c, s, s, s, s, s])
    before = torch.tensor([c, c, s, a, s, s, c, s, a])
    after = torch.tensor([s, c, s, s, c, s, c, a, c])
    row = _row(after, y, before, 8 / 255, 1.5)
    assert row == {"eps": 8 / 255, "acc_clean": 0.25, "acc_stamped": 0.2, "acc": 2 / 9, "abstain": 1 / 9,
                   "abstain_clean": 0.0, "abstain_stamped": 0.2, "forgery_success": 0.5, "n_forged": 1,
                   "removal_success": 1 / 3, "n_removed": 1, "seconds": 1.5}
    nothing_to_forge = _row(after, y, torch.full((9,), s), 0.0, 0.0)
    assert nothing_to_forge["forgery_success"] is None and nothing_to_forge["n_forged"] == 0


def test_smoothed_table_reports_abstentions_as_wrong(smoothed_table):
    table = smoothed_table
    assert table["sigma"] == SIGMA
    assert set(table["attacks"]) == {"apgd-ce", "square", "apgd-eot", "adaptive"}
    n_clean, n_stamped = table["n_clean"], table["n_stamped"]
    for row in [table["no_attack"], *(r for rows in table["attacks"].values() for r in rows.values())]:
        for key in ("acc_clean", "acc_stamped", "acc", "abstain", "abstain_clean", "abstain_stamped"):
            assert 0 <= row[key] <= 1
        assert row["acc"] == pytest.approx((row["acc_clean"] * n_clean + row["acc_stamped"] * n_stamped)
                                           / (n_clean + n_stamped))
        assert row["acc_clean"] + row["abstain_clean"] <= 1 + 1e-9
        if "n_forged" in row:  # read as STAMPED: neither correct nor abstained
            assert row["n_forged"] <= round((1 - row["acc_clean"] - row["abstain_clean"]) * n_clean)
    apgd = table["attacks"]["apgd-eot"]
    assert apgd[eps_label(8 / 255)]["acc"] < table["no_attack"]["acc"]
    for previous, row in zip(list(apgd.values()), list(apgd.values())[1:]):
        assert row["acc"] <= previous["acc"]


class CoinScanner(nn.Module):
    """Answers by the sign of (first pixel − 0.5): on images whose first pixel is 0.5, noise makes it a coin."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        score = x[:, 0, 0, 0] - 0.5 + self.bias
        return torch.stack([-score, score], 1)


def test_a_scanner_that_always_abstains_scores_zero():
    x = torch.full((4, 3, 8, 8), 0.5)
    table = robustness_table(CoinScanner(), x[:2], x[2:], AttackSettings.quick(eps=(8 / 255,), smooth_n=32),
                             sigma=0.5)
    assert table["no_attack"] == {"acc_clean": 0.0, "acc_stamped": 0.0, "acc": 0.0, "abstain": 1.0,
                                  "abstain_clean": 1.0, "abstain_stamped": 1.0}
    row = table["attacks"]["adaptive"][eps_label(8 / 255)]
    assert row["acc"] == 0.0 and row["abstain"] == 1.0
    assert row["forgery_success"] is None and row["removal_success"] is None  # no image to forge from
    assert ABSTAIN == -1


def test_an_image_turned_at_a_small_eps_stays_turned_at_larger_ones(monkeypatch):
    """ε-balls are nested: what an attack achieved at a smaller ε counts at every larger one. A flipped image
    is not attacked again; an abstention is, and keeps the worse verdict (correct < abstain < flipped)."""
    small, mid, big = 1 / 255, 2 / 255, 4 / 255
    calls = []

    def scripted_attack(model, x, y, eps, name, settings, **kwargs):
        """At `small`: image 0 to the coin's edge (abstains when smoothed), image 1 to the other class;
        at `mid`: nothing works; at `big`: everything it is given goes to the other class."""
        calls.append((name, eps, len(x)))
        x_adv = x.clone()
        if eps == small:
            x_adv[0, 0, 0, 0], x_adv[1, 0, 0, 0] = 0.5, 1.0
        elif eps == big:
            x_adv[:, 0, 0, 0] = 1.0 - y.float()
        return x_adv

    monkeypatch.setattr(report.attacks, "attack", scripted_attack)
    clean, stamped = torch.zeros(3, 3, 4, 4), torch.ones(2, 3, 4, 4)
    settings = AttackSettings.quick(eps=(big, small, mid), smooth_n=32)
    for sigma in (None, 0.1):
        calls.clear()
        table = robustness_table(CoinScanner(), clean, stamped, settings, sigma=sigma)
        assert table["no_attack"]["acc"] == 1.0
        rows = table["attacks"]["apgd-ce"]
        assert list(rows) == [eps_label(small), eps_label(mid), eps_label(big)]
        assert [rows[eps_label(e)]["n_forged"] for e in (small, mid, big)] == [1, 1, 3]
        assert [rows[eps_label(e)]["n_removed"] for e in (small, mid, big)] == [0, 0, 2]
        if sigma is None:  # first pixel 0.5: a tie, which argmax gives to CLEAN, the right answer
            assert [rows[eps_label(e)]["acc_clean"] for e in (small, mid, big)] == [2 / 3, 2 / 3, 0.0]
        else:  # image 0 abstains at small, keeps abstaining at mid (where the attack fails), flips at big
            assert [rows[eps_label(e)]["abstain_clean"] for e in (small, mid, big)] == [1 / 3, 1 / 3, 0.0]
            assert [rows[eps_label(e)]["acc_clean"] for e in (small, mid, big)] == [1 / 3, 1 / 3, 0.0]
        # image 1, flipped at small, is never attacked again
        assert [n for name, eps, n in calls if name == "apgd-ce"] == [5, 4, 4]


@pytest.mark.parametrize("sigma", [None, 0.1])
def test_adaptive_counts_an_image_turned_by_either_of_its_attacks(monkeypatch, sigma):
    turns = {"apgd-ce": 0, "apgd-eot": 0, "square": 1}  # which clean image each attack forges

    def scripted_attack(model, x, y, eps, name, settings, **kwargs):
        x_adv = x.clone()
        x_adv[turns[name], 0, 0, 0] = 1.0
        return x_adv

    monkeypatch.setattr(report.attacks, "attack", scripted_attack)
    clean, stamped = torch.zeros(3, 3, 4, 4), torch.ones(2, 3, 4, 4)
    table = robustness_table(CoinScanner(), clean, stamped, AttackSettings.quick(eps=(8 / 255,), smooth_n=32),
                             sigma=sigma)
    row = lambda name: table["attacks"][name][eps_label(8 / 255)]  # noqa: E731
    assert row("square")["n_forged"] == 1 and row("apgd-ce")["n_forged"] == 1
    assert row("adaptive")["n_forged"] == 2 and row("adaptive")["acc_clean"] == pytest.approx(1 / 3)
    assert row("adaptive")["seconds"] >= row("square")["seconds"]


def test_tables_are_plain_json(plain_table, smoothed_table):
    for table in (plain_table, smoothed_table):
        assert json.loads(json.dumps(table, allow_nan=False)) == table


def test_noisy_scanner_adds_fresh_gaussian_noise_of_std_sigma():
    first_pixel = CoinScanner()  # logit 1 = first pixel - 0.5
    noisy = NoisyScanner(first_pixel, 0.3)
    x = torch.full((4000, 3, 2, 2), 0.5, requires_grad=True)
    logits = noisy(x)
    assert logits[:, 1].std().item() == pytest.approx(0.3, rel=0.1)
    assert logits[:, 1].mean().item() == pytest.approx(0.0, abs=0.03)
    logits[:, 1].sum().backward()
    assert x.grad[:, 0, 0, 0].eq(1).all()
    counts = noisy.votes(x[:5].detach(), 7)
    assert counts.shape == (5, 2) and counts.sum(1).eq(7).all()
    with pytest.raises(ValueError, match="sigma"):
        NoisyScanner(first_pixel, 0.0)
