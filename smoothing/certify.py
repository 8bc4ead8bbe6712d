"""Certify a trained checkpoint on a folder of photos: each photo clean (label 0) and stamped (label 1).

    python -m smoothing.certify --model results/rs050 --data_path PATH/test_photos
    python -m smoothing.certify --model results/rs050/model --sigma 0.5 --n 10000 --max_images 20

Writes Cohen et al.'s TSV (`idx label predict radius correct time`, one row per certified image) and, beside
it, a markdown table of certified accuracy at L2 radii 0, 0.25, 0.5, 0.75, 1.0, 1.5 and 2.0 (also printed).
The library functions (certify_images, write_tsv, read_tsv, certified_accuracy, format_table) are what
evaluate.py uses.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from datasets import ImageFolderDataset, resolve_image_paths
from engine.cli import HelpFormatter, non_negative_int, positive_float, positive_int, significance
from engine.device import full_precision, pick_device
from models import CLEAN, STAMPED, load_pretrained
from models.io import CONFIG_NAME

from .core import ABSTAIN, Smooth

#: The radii of the certified-accuracy table, in [0,1]-pixel L2 units (those of Cohen et al.'s figures).
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
#: Cohen et al.'s certify.py columns, in their order.
TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")


@dataclass(frozen=True)
class CertifyRow:
    """One certified image: a TSV row.

    idx: row number (0, 1, 2, ...); the CLI certifies photo i clean as row 2i and stamped as row 2i+1.
    label: the true class (0 = clean, 1 = stamped). predict: the certified class, or ABSTAIN (-1).
    radius: certified L2 radius in [0,1]-pixel units (0.0 on abstention). correct: 1 if predict == label.
    time: seconds spent in Smooth.certify for this image (Cohen writes a timedelta; seconds parse easier).
    """

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float

    def tsv_line(self) -> str:
        return f"{self.idx}\t{self.label}\t{self.predict}\t{self.radius:.4f}\t{self.correct}\t{self.time:.3f}"


@torch.no_grad()
def stamp(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (B,3,H,W) in [0,1] → stamped x' = clamp(x + E(x), 0, 1), same shape, in fp32 on every device."""
    with full_precision(x.device):
        residual = encoder(x)
    return (x + residual.float()).clamp(0, 1)


def certify_labelled(smooth: Smooth, items: Iterable[tuple[torch.Tensor, int]], *, n0: int, n: int, alpha: float,
                     batch_size: int, generator: torch.Generator | None = None,
                     start_idx: int = 0) -> Iterator[CertifyRow]:
    """Certify (image (3,H,W) in [0,1], true label) pairs one by one; yields a CertifyRow per pair, lazily,
    so a caller can write and show each result as soon as it exists. The settings are Smooth.certify's (the
    callers' flags hold Cohen's defaults)."""
    for idx, (x, label) in enumerate(items, start=start_idx):
        t0 = time.perf_counter()
        predict, radius = smooth.certify(x, n0=n0, n=n, alpha=alpha, batch_size=batch_size, generator=generator)
        elapsed = time.perf_counter() - t0  # certify ends on a .cpu() copy, so GPU work is finished here
        yield CertifyRow(idx, int(label), int(predict), float(radius), int(predict == label), elapsed)


def certify_images(encoder: torch.nn.Module, smooth: Smooth, images: Iterable[torch.Tensor], *, n0: int, n: int,
                   alpha: float, batch_size: int, generator: torch.Generator | None = None) -> Iterator[CertifyRow]:
    """Certify each photo clean (label 0) and stamped with `encoder` (label 1): rows 2i and 2i+1 for photo i.

    images: (3,H,W) tensors in [0,1]; each is moved to the encoder's device and stamped there.
    """
    device = next(encoder.parameters()).device

    def pairs():
        for x in images:
            x = x.to(device)
            yield x, CLEAN
            yield stamp(encoder, x.unsqueeze(0))[0], STAMPED

    yield from certify_labelled(smooth, pairs(), n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                                generator=generator)


def write_tsv(rows: Iterable[CertifyRow], path) -> list[CertifyRow]:
    """Write rows under Cohen's header as they arrive, and return them.

    Each row is flushed to PATH.partial as soon as it is produced (a long run shows its progress there and
    keeps what it had if it dies); the file becomes PATH only when every row is in, so a complete-looking
    TSV is always a complete one. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    written = []
    with open(partial, "w") as f:
        f.write("\t".join(TSV_COLUMNS) + "\n")
        for row in rows:
            f.write(row.tsv_line() + "\n")
            f.flush()
            written.append(row)
    os.replace(partial, path)
    return written


def read_tsv(path) -> list[CertifyRow]:
    """Read a TSV written by write_tsv (or by Cohen's certify.py, whose h:mm:ss times are converted)."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines or tuple(lines[0].split("\t")) != TSV_COLUMNS:
        raise ValueError(f"{path}: not a certification TSV (expected the header {' '.join(TSV_COLUMNS)})")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if len(fields) != len(TSV_COLUMNS):
                raise ValueError(f"{len(fields)} fields")
            idx, label, predict, correct = (int(fields[i]) for i in (0, 1, 2, 4))
            rows.append(CertifyRow(idx, label, predict, float(fields[3]), correct, _seconds(fields[5])))
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: malformed row ({e})") from None
    return rows


def _seconds(text: str) -> float:
    if ":" not in text:
        return float(text)
    h, m, s = text.split(":")
    return 3600 * int(h) + 60 * int(m) + float(s)


def certified_accuracy(rows: Iterable[CertifyRow], radii: Iterable[float] = RADII) -> dict[float, float]:
    """Certified accuracy at each radius r: the fraction of rows that are correct with radius ≥ r.

    As in Cohen et al.'s analysis; an abstention counts as wrong at every radius. NaN for no rows.
    """
    rows = list(rows)
    return {float(r): (sum(row.correct and row.radius >= r for row in rows) / len(rows) if rows else math.nan)
            for r in radii}


def format_table(rows: Iterable[CertifyRow], radii: Iterable[float] = RADII) -> str:
    """A markdown table of certified accuracy (%) at each radius: all rows, clean (label 0), stamped (label 1),
    then the share of abstentions."""
    rows, radii = list(rows), list(radii)
    groups = [("all", rows), ("clean", [r for r in rows if r.label == CLEAN]),
              ("stamped", [r for r in rows if r.label == STAMPED])]
    accuracy = [certified_accuracy(g, radii) for _, g in groups]
    lines = ["| L2 radius | " + " | ".join(f"{name} ({len(g)})" for name, g in groups) + " |",
             "|---:|" + "---:|" * len(groups)]
    for r in radii:
        lines.append(f"| {r:.2f} | " + " | ".join(_percent(acc[float(r)]) for acc in accuracy) + " |")
    abstained = [sum(row.predict == ABSTAIN for row in g) / len(g) if g else math.nan for _, g in groups]
    lines.append("| abstained | " + " | ".join(_percent(a) for a in abstained) + " |")
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}%"


# ---------------------------------------------------------------------------------------------------- CLI
def resolve_model(path) -> tuple[Path, Path | None, dict]:
    """A run folder (holding model/) or a model folder (holding config.json) → (model dir, run dir or None,
    the run's args.json as a dict, {} when there is none)."""
    path = Path(path)
    if (path / "model" / CONFIG_NAME).is_file():
        model_dir, run_dir = path / "model", path
    elif (path / CONFIG_NAME).is_file():
        model_dir, run_dir = path, (path.parent if path.name == "model" else None)
    elif not path.exists():
        raise FileNotFoundError(f"--model {path}: no such folder")
    else:
        raise FileNotFoundError(f"--model {path}: neither a run folder (with model/{CONFIG_NAME}) nor a model "
                                f"folder (with {CONFIG_NAME})")
    run_args = {}
    if run_dir is not None and (run_dir / "args.json").is_file():
        try:
            run_args = json.loads((run_dir / "args.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{run_dir / 'args.json'}: not valid JSON ({e})") from None
    return model_dir, run_dir, run_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smoothing.certify", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="a run folder (results/RUN, holding model/) or a model folder (holding config.json)")
    p.add_argument("--data_path", default=None,
                   help="folder of clean photos, searched recursively; each is certified clean and stamped. "
                        "Default: the photos scikit-image ships")
    p.add_argument("--sigma", type=positive_float, default=None,
                   help="smoothing noise std in [0,1] pixel units. Default: the run's --std from args.json "
                        "(train_rs.py runs); required otherwise")
    p.add_argument("--n0", type=positive_int, default=100, help="noise samples that select the class")
    p.add_argument("--n", type=positive_int, default=100_000,
                   help="noise samples that estimate its probability; cost is linear in n0 + n")
    p.add_argument("--alpha", type=significance, default=0.001,
                   help="failure probability of each certificate")
    p.add_argument("--batch_size", type=positive_int, default=400,
                   help="noisy copies classified at once (memory: batch_size × one image's activations)")
    p.add_argument("--out", default=None,
                   help="the TSV to write; the table goes beside it as .md. Default: "
                        "RUN/eval/certify_sigma<SIGMA>.tsv (results/<model folder name>/eval/... for a bare "
                        "model folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max_images", type=positive_int, default=None,
                   help="certify only the first N photos (sorted by path); each gives two rows")
    p.add_argument("--size", type=non_negative_int, default=400,
                   help="side in pixels: each photo is resized (short side) and centre-cropped to a square of "
                        "this side; 0 keeps the native resolution")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise generator")
    return p


def run(args, log=print) -> list[CertifyRow]:
    """The CLI's work, on parsed args; raises ValueError/FileNotFoundError with one-line messages."""
    model_dir, run_dir, run_args = resolve_model(args.model)
    sigma = args.sigma
    trained_std = run_args.get("std")
    if sigma is None:
        if trained_std is None:
            where = run_dir / "args.json" if run_dir is not None else model_dir
            raise ValueError(f"--sigma is required: {where} gives no training --std (not a train_rs.py run)")
        sigma = float(trained_std)
    elif trained_std is not None and float(trained_std) != sigma:
        log(f"note: certifying with --sigma {sigma:g}, but the scanner was trained with --std {trained_std:g}")

    if args.out is not None:
        out = Path(args.out)
    else:
        base = run_dir if run_dir is not None else Path("results") / model_dir.name
        out = base / "eval" / f"certify_sigma{sigma:g}.tsv"
    if out.suffix == ".md":
        raise ValueError(f"--out {out}: the table is written beside the TSV as .md; name the TSV *.tsv")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out}: already exists; pass --overwrite to replace it")

    device = pick_device(args.device)
    encoder, scanner, _ = load_pretrained(model_dir, device=device)
    if encoder is None:
        raise ValueError(f"{model_dir} holds a scanner only (converted from the original code): certification "
                         f"judges each photo clean and stamped, and stamping needs an encoder")
    paths = resolve_image_paths(args.data_path, log=log)
    dataset = ImageFolderDataset(paths, args.size or None, mode="center" if args.size else "full")
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    # Noise on the scanner's device when it has its own generator (CUDA); a CPU generator for MPS.
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(args.seed)
    smooth = Smooth(scanner, sigma)

    log(f"certifying {count} photos × (clean, stamped) from {model_dir} on {device}: sigma {sigma:g}, "
        f"n0 {args.n0}, n {args.n}, alpha {args.alpha:g}, "
        f"{f'{args.size}×{args.size}' if args.size else 'native resolution'}")
    rows_iter = certify_images(encoder, smooth, (dataset[i] for i in range(count)), n0=args.n0, n=args.n,
                              alpha=args.alpha, batch_size=args.batch_size, generator=generator)
    bar = tqdm(rows_iter, total=2 * count, unit="img", desc="certify", dynamic_ncols=True, file=sys.stderr)

    def with_postfix(rows):
        for row in rows:
            bar.set_postfix({"s/img": f"{row.time:.2f}", "radius": f"{row.radius:.2f}"}, refresh=False)
            yield row

    try:
        rows = write_tsv(with_postfix(bar), out)
    finally:
        bar.close()

    table = format_table(rows)
    seconds = sum(r.time for r in rows) / len(rows)
    speed = (f"{len(rows)} images ({count} photos, clean and stamped), {seconds:.2f} s per image "
             f"(n0 + n = {args.n0 + args.n} samples, batch {args.batch_size}, {device})")
    header = (f"Certified accuracy of {model_dir} under Gaussian smoothing, sigma {sigma:g}, n0 {args.n0}, "
              f"n {args.n}, alpha {args.alpha:g}; {speed}. Rows: {out.name}.")
    md = out.with_suffix(".md")
    md.write_text(header + "\n\n" + table + "\n")
    log("\n" + table + "\n")
    log(f"{speed}\nwrote {out} and {md}")
    return rows


def main(argv=None) -> list[CertifyRow]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted; the rows certified so far are in the .partial file beside --out\n")


if __name__ == "__main__":
    main()
