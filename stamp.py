"""Stamp photos: write a copy of each with DeepRAFT's invisible stamp, at the photo's own resolution.

    python stamp.py --model pretrained_models/rs_aug photo.jpg holidays/ --out stamped/
    python stamp.py --model results/demo photo.jpg --out stamped/ --quality 90      # JPEG instead of PNG

Each INPUT is an image file or a folder (searched recursively; hidden files are skipped). A file is written
to OUT/<stem>.png (OUT/<stem>.jpg with --quality); a folder's images keep their relative paths under OUT.
Photos are read upright: the EXIF orientation is applied to the pixels, so the written image is upright and
carries no EXIF (no orientation tag, no camera or GPS data). Grey, palette, RGBA (on white), CMYK and 16-bit
images are written as 8-bit RGB.

Any size works. The stamp encoder runs on the photo brought to a working resolution (long side
--working_size, antialiased); its residual is upsampled to the photo's resolution and added there, so a
12-megapixel photo costs one 512-pixel encoder pass. scan.py looks at received photos at the same working
resolution, so the scanner sees the stamp at the scale the encoder made it, whatever the photo's size. An
encoder that takes one input size only (the original code's, arch 'stegastamp': 400×400) stamps each photo
fitted to that size, as the original code fits it (ImageOps.fit: centre square, resized), and the stamped
copy is written at that size. A model folder that holds a scanner only cannot stamp.

An input is never written over, not even with --overwrite, and --out may not be an input folder or lie inside
one; an existing output is replaced only with --overwrite. Outputs are written to a temporary file and
renamed, so an interrupted run leaves no half-written image. Each image's line gives its PSNR (of the 8-bit
stamped pixels against the photo's, before any JPEG compression) and its time. Unreadable files are reported
and skipped. Exit status: 0 when every image was stamped, 1 when some could not be, 2 for bad flags, a bad
model, or outputs that would clash with inputs or existing files.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from datasets.images import load_rgb
from engine.cli import HelpFormatter, non_negative_int
from engine.device import pick_device
from product.files import (PNG_COMPRESS_LEVEL, Item, expand_inputs, read_pixels, report_failures,  # noqa: F401
                           write_image)
from product.stamping import (DEFAULT_WORKING_SIZE, fit_pixels, fit_text, load_model, psnr,  # noqa: F401
                              stamp_pixels, to_working, working_shape)


def check_out_folder(inputs, out: Path) -> None:
    """Refuse an --out that is an input folder or lies inside one: a second run would take the stamped copies
    for inputs (and stamp them again, one folder deeper)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    real_out = Path(os.path.realpath(out))
    for text in inputs:
        folder = Path(text)
        if folder.is_dir():
            real = Path(os.path.realpath(folder))
            if real_out == real or real in real_out.parents:
                where = "is" if real_out == real else "lies inside"
                raise ValueError(f"--out {out}: {where} the input folder {folder}, whose images would then include "
                                 f"the stamped copies; choose an --out outside it")


def plan_outputs(items: list[Item], out: Path, ext: str, overwrite: bool) -> dict[int, Path]:
    """Output path of each readable item (by index). Raises ValueError, before anything is written, when an
    output would be an input (even with overwrite), when two inputs would share an output, or when an output
    exists and overwrite is off."""
    inputs = {os.path.realpath(item.path): item.path for item in items if item.error is None}
    inodes = {}
    for item in items:
        if item.error is None:
            with _ignore_os_errors():
                st = item.path.stat()
                inodes[(st.st_dev, st.st_ino)] = item.path
    plan, first = {}, {}
    existing = []
    for i, item in enumerate(items):
        if item.error is not None:
            continue
        rel = item.rel if item.rel is not None else Path(item.path.name)
        target = out / rel.parent / (rel.stem + ext)
        real = os.path.realpath(target)
        clash = inputs.get(real)
        if clash is None and target.exists():
            with _ignore_os_errors():
                st = target.stat()
                clash = inodes.get((st.st_dev, st.st_ino))
        if clash is not None:
            raise ValueError(f"{target}: is the input {clash}; stamp.py never writes over an input, not even "
                             f"with --overwrite: choose another --out")
        if real in first:
            raise ValueError(f"{first[real]} and {item.path} would both be written to {target}; stamp them into "
                             f"different --out folders")
        first[real] = item.path
        if target.exists():
            existing.append(target)
        plan[i] = target
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]}: already exists{more}; pass --overwrite to replace existing outputs")
    return plan


class _ignore_os_errors:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)



# ------------------------------------------------------------------------------------------------ CLI
def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a JPEG quality from 1 to 100, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stamp.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders (searched recursively)")
    p.add_argument("--model", required=True,
                   help="a model folder (holding config.json, e.g. pretrained_models/rs_aug) or a run folder "
                        "(results/RUN, holding model/)")
    p.add_argument("--out", required=True, type=Path, help="folder the stamped copies are written to")
    p.add_argument("--quality", type=_quality, default=None,
                   help="write JPEG at this quality (1-100; 4:4:4 chroma) instead of PNG")
    p.add_argument("--working_size", type=non_negative_int, default=DEFAULT_WORKING_SIZE,
                   help="long side in pixels at which the stamp is made (then upsampled to the photo's size); "
                        "0 = native resolution (slow for large photos). scan.py must use the same value")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (inputs are never written over)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    return p


def run(args) -> dict:
    """The CLI's work on parsed args → summary dict. Raises ValueError/FileNotFoundError (one line) for bad
    flags, a bad model, or a refused plan; unreadable images are reported and counted, never raised."""
    check_out_folder(args.inputs, args.out)
    device = pick_device(args.device)
    model_dir, _, _, encoder, _, _ = load_model(args.model, device)
    if encoder is None:
        raise ValueError(f"{model_dir} holds a scanner only (converted from the original code): it cannot stamp")
    fit = encoder.input_size  # the original's encoder (arch 'stegastamp') takes 400×400 only
    ext = ".png" if args.quality is None else ".jpg"
    items = expand_inputs(args.inputs)
    plan = plan_outputs(items, args.out, ext, args.overwrite)

    fmt = "PNG" if args.quality is None else f"JPEG quality {args.quality}"
    size_text = "working resolution " + (f"long side {args.working_size} px" if args.working_size else
                                         "native resolution")
    if fit:
        size_text = fit_text(fit) + ", written at that size"
    print(f"stamping {len(plan)} image(s) with {model_dir} on {device}: {size_text}, "
          f"writing {fmt} to {args.out}/", file=sys.stderr, flush=True)

    done, failed, psnrs, seconds = 0, [], [], 0.0
    reasons = []  # (path, reason) of every input not stamped, listed again at the end
    bar = tqdm(items, unit="img", desc="stamp", file=sys.stderr, dynamic_ncols=True, disable=None if len(items) > 1
               else True)
    for i, item in enumerate(bar):
        if item.error is not None:
            failed.append(item.path)
            reasons.append((item.path, item.error))
            tqdm.write(f"stamp.py: {item.path}: {item.error} (skipped)", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        try:
            pixels = read_pixels(item.path)
        except ValueError as e:  # ImageReadError: "<path>: <reason>"
            failed.append(item.path)
            reasons.append((item.path, getattr(e, "reason", None) or str(e)))
            tqdm.write(f"stamp.py: {e} (skipped)", file=sys.stderr)
            continue
        photo_h, photo_w = pixels.shape[:2]
        if fit:
            pixels = fit_pixels(pixels, fit)
        stamped, work = stamp_pixels(encoder, pixels, 0 if fit else args.working_size)
        quality = psnr(stamped, pixels)
        target = plan[i]
        try:
            write_image(stamped, target, args.quality)
        except OSError as e:
            failed.append(item.path)
            reasons.append((item.path, f"cannot write {target} ({e})"))
            tqdm.write(f"stamp.py: {target}: cannot write ({e}); {item.path} skipped", file=sys.stderr)
            continue
        elapsed = time.perf_counter() - t0
        done, seconds = done + 1, seconds + elapsed
        psnrs.append(quality)
        h, w = pixels.shape[:2]
        where = "natively" if work == (h, w) else f"at {work[1]}×{work[0]}"
        if fit:
            where += f" on the photo fitted from {photo_w}×{photo_h}"
        tqdm.write(f"{item.path} -> {target}: {w}×{h}, stamp made {where}, PSNR {quality:.2f} dB, {elapsed:.2f} s",
                   file=sys.stdout)
    bar.close()
    finite = [p for p in psnrs if math.isfinite(p)]
    summary = {"stamped": done, "failed": [str(p) for p in failed], "out": str(args.out),
               "mean_psnr": sum(finite) / len(finite) if finite else None,
               "seconds_per_image": seconds / done if done else None, "working_size": args.working_size,
               "fitted_to": fit}
    mean = f"mean PSNR {summary['mean_psnr']:.2f} dB" if finite else "mean PSNR n/a"
    per = f"{summary['seconds_per_image']:.2f} s/image" if done else "no image stamped"
    print(f"stamped {done} of {len(items)} image(s) into {args.out}/ ({len(failed)} failed): {mean}, {per} "
          f"(read, stamp, write), {size_text}", flush=True)
    report_failures("not stamped", reasons)
    return summary


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted; every output written so far is complete\n")
    return 1 if summary["failed"] else 0


# ------------------------------------------------------------------------------------------------ benchmark
def benchmark(model=None, size: tuple[int, int] = (3000, 4000), working_size: int = DEFAULT_WORKING_SIZE,
              repeats: int = 3, log=print) -> dict:
    """Seconds to stamp one synthetic `size` (H, W) photo, and the PSNR at 400×400 against `size`.

    The photo is scikit-image's coffee.png resized to `size` plus mild Gaussian noise (a sensor's grain). With
    model=None an untrained, default-initialised StampEncoder is used: its residual is random but bounded,
    which is all that timing and a PSNR comparison need. Reports the median of `repeats` runs of: PNG
    decoding, stamping from pixels (working resolution, encoder, upsampling, adding, rounding), PSNR, PNG
    encoding, and the whole round trip from file to file.

        python -c "import stamp; stamp.benchmark()"
    """
    import io
    import statistics
    import tempfile

    from datasets.samples import sample_photo_paths
    from models import StampEncoder

    torch.manual_seed(0)
    if model is None:
        encoder = StampEncoder().eval().to(memory_format=torch.channels_last)
        name = "untrained StampEncoder()"
    else:
        encoder, name = load_model(model, torch.device("cpu"))[3], str(model)
    coffee = load_rgb([p for p in sample_photo_paths() if p.name == "coffee.png"][0])
    rng = np.random.default_rng(0)

    def photo(hw):
        base = np.asarray(coffee.resize((hw[1], hw[0]), Image.BICUBIC), dtype=np.float32)
        return np.clip(base + rng.normal(0, 2, base.shape), 0, 255).round().astype(np.uint8)

    def median_time(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    big, small = photo(size), photo((400, 400))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "photo.png"), Path(tmp, "out", "photo.png")
        Image.fromarray(big).save(src, compress_level=1)
        stamped, work = stamp_pixels(encoder, big, working_size)
        encoded = io.BytesIO()
        Image.fromarray(stamped).save(encoded, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        result = {
            "model": name, "size": list(size), "working": list(work), "threads": torch.get_num_threads(),
            "load_1min": os.getloadavg()[0],
            "decode_s": median_time(lambda: read_pixels(src)),
            "stamp_s": median_time(lambda: stamp_pixels(encoder, big, working_size)),
            "psnr_s": median_time(lambda: psnr(stamped, big)),
            "png_encode_s": median_time(lambda: write_image(stamped, dst, None)),
            "png_mb": round(len(encoded.getvalue()) / 1e6, 1),
            "file_to_file_s": median_time(lambda: write_image(stamp_pixels(encoder, read_pixels(src),
                                                                           working_size)[0], dst, None)),
            "psnr_12mp_db": psnr(stamped, big),
            "psnr_400_db": psnr(stamp_pixels(encoder, small, working_size)[0], small),
        }
    log(f"{name}, {size[1]}×{size[0]} photo (stamp made at {work[1]}×{work[0]}), {result['threads']} threads, "
        f"1-min load {result['load_1min']:.2f}: stamp {result['stamp_s']:.2f} s from pixels; decode PNG "
        f"{result['decode_s']:.2f} s; PSNR {result['psnr_s']:.2f} s; encode PNG {result['png_encode_s']:.2f} s "
        f"({result['png_mb']} MB); file to file {result['file_to_file_s']:.2f} s. PSNR {result['psnr_12mp_db']:.2f} "
        f"dB at {size[1]}×{size[0]}, {result['psnr_400_db']:.2f} dB at 400×400")
    return result


if __name__ == "__main__":
    sys.exit(main())
