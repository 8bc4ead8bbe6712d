"""Does a stamp survive a shift of the pixel grid? Stamp photos, crop them a few rows and columns in, scan the crops.

Each photo is stamped at its native resolution (stamp.py --working_size 0), rounded to 8-bit pixels; then for
every shift (dy, dx) the crop stamped[dy : dy + H', dx : dx + W'] (H' = H − the largest dy, W' = W − the largest
dx, so every crop has the same size) is judged at native resolution with the settings of `scan.py
--working_size 0`: the model's calibration.json, sequential PREDICT for a smoothed model (one noise stream for
all crops). Nothing is resampled, so a stamp that is lost at some shifts is locked to the pixel grid: a crop
that moves the grid by such a shift removes it. The grid printed: photos read stamped at each shift.
docs/models.md reports what the shipped models do; training with --grid_shift is meant to unlock it.

    python -m report.shift_probe pretrained_models/baseline ../shared/data/bsds400/test_100007.jpg
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.cli import HelpFormatter, non_negative_int, positive_int
from models import STAMPED
from product.files import expand_inputs, pixels_to_tensor, read_pixels
from product.scanning import PhotoScanner, ScanSettings
from product.stamping import stamp_pixels


def shifted_crops(pixels: np.ndarray, rows: list[int], columns: list[int]):
    """(H,W,3) → {(dy, dx): the crop starting dy rows down and dx columns in}, all of one size: H − max(rows) by
    W − max(columns). Views, no copies."""
    height, width = pixels.shape[0] - max(rows), pixels.shape[1] - max(columns)
    if height < 1 or width < 1:
        raise ValueError(f"shifts up to {max(rows)} rows and {max(columns)} columns leave nothing of a "
                         f"{pixels.shape[1]}×{pixels.shape[0]} photo")
    return {(dy, dx): pixels[dy:dy + height, dx:dx + width] for dy in rows for dx in columns}


def shift_list(text: str) -> list[int]:
    """'0-17' or '0,1,2,5' (or a mix: '0-3,8') → sorted distinct shifts ≥ 0."""
    shifts = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            first, last = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be shifts ≥ 0 such as 0-17 or 0,1,2,5, got {text!r}") from None
        if last < first:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is a backwards range")
        shifts.update(range(first, last + 1))
    return sorted(shifts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m report.shift_probe", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("model", help="a model folder (pretrained_models/NAME) or a run folder (results/RUN)")
    p.add_argument("inputs", nargs="+", metavar="PHOTO", help="photos, or folders searched recursively")
    p.add_argument("--rows", type=shift_list, default="0-17",
                   help="shifts down, in rows: a range (0-17) or a list (0,7,16)")
    p.add_argument("--columns", type=shift_list, default="0,1,2,3,5,8,13",
                   help="shifts right, in columns, as --rows")
    p.add_argument("--n", type=positive_int, default=1000,
                   help="a smoothed model's noise samples per verdict (the most: sequential PREDICT stops early)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the noise")
    p.add_argument("--json", type=Path, default=None, help="also write the grid to this .json file")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    return p


def run(args, out=None, err=None) -> dict:
    """Parsed args → {"rows", "columns", "photos", "stamped": {"dy,dx": photos read stamped}}. Raises ValueError
    or FileNotFoundError (one line) for a bad model or photo."""
    out, err = out or sys.stdout, err or sys.stderr

    def log(text):
        print(text, file=err, flush=True)

    if args.json is not None and args.json.suffix != ".json":
        raise ValueError(f"--json {args.json}: must be a .json file")
    if args.json is not None and args.json.exists():
        raise ValueError(f"--json {args.json}: already exists; remove it or name another file")
    scanner = PhotoScanner(ScanSettings(model=args.model, working_size=0, n=args.n, seed=args.seed,
                                        device=args.device), log)
    if scanner.fit:
        raise ValueError(f"{args.model}: a scanner fixed at {scanner.fit}×{scanner.fit} resamples every photo; "
                         "shifts of its pixel grid mean nothing")
    encoder = scanner.encoder
    if encoder is None:
        raise ValueError(f"{args.model}: a scanner-only folder, no encoder to stamp with")
    items = expand_inputs(args.inputs)
    photos = {}  # every photo read and checked before the first is stamped
    for item in items:
        if item.error is not None:
            raise ValueError(f"{item.path}: {item.error}")
        photos[item.path] = read_pixels(item.path)  # ImageReadError (a ValueError) names the file
        try:
            shifted_crops(photos[item.path], args.rows, args.columns)
        except ValueError as e:
            raise ValueError(f"{item.path}: {e}") from None
    log(f"shift probe of {len(photos)} photo(s), {len(args.rows)} × {len(args.columns)} shifts, {scanner.describe()}")
    stamped = {(dy, dx): 0 for dy in args.rows for dx in args.columns}
    t0 = time.perf_counter()
    bar = tqdm(total=len(photos) * len(stamped), unit="crop", desc="shift probe", file=err, dynamic_ncols=True,
               disable=None)
    for photo in photos.values():
        pixels, _ = stamp_pixels(encoder, photo, working_size=0)
        for shift, crop in shifted_crops(pixels, args.rows, args.columns).items():
            verdict, _, _ = scanner.judge_tensor(pixels_to_tensor(np.ascontiguousarray(crop), scanner.device))
            stamped[shift] += verdict == STAMPED
            bar.update()
    bar.close()
    n = len(photos)
    width = max(len(f"{n}/{n}"), max(len(str(dx)) for dx in args.columns))
    print(f"photos read stamped, of {n}, after shifting the stamped photo down dy rows and right dx columns", file=out)
    print("dy \\ dx " + " ".join(f"{dx:>{width}}" for dx in args.columns), file=out)
    for dy in args.rows:
        print(f"{dy:>7} " + " ".join(f"{f'{stamped[dy, dx]}/{n}':>{width}}" for dx in args.columns), file=out)
    kept = [shift for shift, count in stamped.items() if count == n]
    log(f"{len(kept)} of {len(stamped)} shifts kept the stamp on every photo, {sum(c == 0 for c in stamped.values())} "
        f"lost it on every photo ({time.perf_counter() - t0:.0f} s)")
    result = {"model": args.model, "photos": [str(path) for path in photos], "rows": args.rows,
              "columns": args.columns, "judge": scanner.describe(),
              "stamped": {f"{dy},{dx}": count for (dy, dx), count in stamped.items()}}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
