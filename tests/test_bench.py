"""bench.py --quick: every measurement runs, before and after, and the table is printed."""
import math

import bench


def test_bench_quick_compare_measures_everything(capsys):
    rows = bench.main(["--quick", "--compare", "--device", "cpu"])
    out = capsys.readouterr().out
    labels = [label for label, _, _ in rows]
    for script in ("train.py", "train_rs.py", "train_rs_aug.py"):
        assert sum(script + "," in label for label in labels) == 2  # two sizes each
    for what in ("scanner inference", "stamping", "certification noise samples", "smoothed verdicts",
                 "Pillow JPEG decode", "scan.py on one"):
        assert any(label.startswith(what) for label in labels), what
    for _, unit, results in rows:
        for value, runs, peak_mb in results.values():
            assert value > 0 and math.isfinite(value) and runs == 1 and peak_mb > 0
    assert sum(label.startswith("smoothed verdicts") for label in labels) == 2  # fixed-n and sequential
    assert sum(label.startswith("scan.py on one") for label in labels) == len(bench.SCAN_MODELS)
    assert "| measurement | unit | before | after | speed-up |" in out and "load average" in out


def test_smooth_chunked_sampling_counts_as_the_loop_it_replaced():
    """bench's "before" certification is Smooth's old loop: on CPU the new one classifies each batch in chunks
    (here 20 noisy 300² copies in chunks of 14), in channels_last, and must count the same votes."""
    import torch

    from models import Scanner, ScannerConfig
    from smoothing import Smooth
    from smoothing.core import CPU_CHUNK_PIXELS

    torch.manual_seed(0)
    scanner = Scanner(ScannerConfig("narrow")).eval()
    x = torch.rand(3, 300, 300)
    assert CPU_CHUNK_PIXELS // (300 * 300) < 20  # the batch below is split
    with torch.no_grad():  # put the decision boundary among the noisy copies, so that the votes split
        noisy = x + 0.5 * torch.randn(16, 3, 300, 300)
        logits = scanner(noisy)
        scanner.fc.bias[1] += (logits[:, 0] - logits[:, 1]).median()
    new = Smooth(scanner, 0.5).counts(x, 40, 20, torch.Generator().manual_seed(1))
    old = bench.reference_counts(scanner, x, 0.5, 40, 20, torch.Generator().manual_seed(1))
    assert int(new.sum()) == 40 and new.min() > 0  # a split vote, not a foregone conclusion
    assert torch.equal(new, old)
