"""Prepare an image folder at one square size: MIRFlickr-25k, MetFaces, or any folder.

    python -m datasets.prepare --src PATH/mirflickr --dst PATH/mirflickr400 --size 400 --fit crop
    python -m datasets.prepare --src PATH/metfaces-dataset/images --dst PATH/metfaces400 --size 400

Every image under --src (searched recursively; non-image files such as MIRFlickr's meta/ and license.txt
are ignored) is read with EXIF orientation applied, converted to 8-bit RGB, fitted to SIZE×SIZE and
written under --dst at the same relative path:

- ``--fit crop``   resize so the short side is SIZE, then take the centre square (no distortion, loses the
                   ends of the long side);
- ``--fit pad``    resize so the long side is SIZE, then pad to a square with black (letterbox);
- ``--fit resize`` resize to SIZE×SIZE, ignoring the aspect ratio.

Resampling is Lanczos, which antialiases when shrinking; smaller images are upscaled (the summary counts
them). ``--format png`` (the default) is lossless, so the prepared pixels are exactly the resized ones and
no second JPEG generation enters the JPEG-robustness experiments; ``jpg`` writes JPEG (``--quality``, 4:4:4
chroma); ``same`` keeps JPEG sources JPEG and writes everything else as PNG.

A run is resumable: an output that exists is complete (outputs are written to a hidden temporary file and
renamed) and is skipped, so running the same command again finishes an interrupted run and otherwise does
nothing. --dst records its settings in ``.prepare.json``; resuming with other settings, or from another
--src, is refused rather than mixing two preparations. --dst may neither be nor lie inside --src (the
source is never written to), nor contain it (training on --dst would read the raw images too).

The functions (plan_jobs, prepare_one, run_plan, prepare_folder, sample_pairs, before_after) are what
Image_Processing.ipynb calls.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageOps

from .images import ImageReadError, NoImagesError, PathLike, find_images, load_rgb

FITS = ("crop", "pad", "resize")
FORMATS = ("png", "jpg", "same")
#: Settings of a prepared folder, kept in it (hidden, so dataset readers never see it).
MANIFEST_NAME = ".prepare.json"
#: Temporary outputs are ``.<name>.<random>.prepare-tmp`` beside their final name: hidden, so that
#: find_images never lists them, and removed by the next run if a run was killed mid-write.
TMP_SUFFIX = ".prepare-tmp"
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_RESAMPLE = Image.Resampling.LANCZOS
_PAD_COLOR = (0, 0, 0)
# How many failures the printed summary names; the manifest lists them all.
_MAX_LISTED = 20


class PrepareError(ValueError):
    """Bad input to a preparation (a flag or a path); the message is one line naming it."""


@dataclass(frozen=True)
class Settings:
    """What a prepared folder holds: SIZE×SIZE images fitted by ``fit``, written as ``format``.

    ``quality`` (1-100) is the JPEG quality, used by ``format="jpg"`` and by JPEG sources with ``"same"``.
    """

    size: int = 400
    fit: str = "crop"
    format: str = "png"
    quality: int = 95

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise PrepareError(f"--size must be a positive number of pixels, got {self.size!r}")
        if self.fit not in FITS:
            raise PrepareError(f"--fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.format not in FORMATS:
            raise PrepareError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise PrepareError(f"--quality must be an integer from 1 to 100, got {self.quality!r}")

    def output_suffix(self, source: Path) -> str:
        """The file suffix an output of ``source`` gets (its format follows from it)."""
        if self.format == "png":
            return ".png"
        if self.format == "jpg":
            return ".jpg"
        return source.suffix if source.suffix.lower() in _JPEG_SUFFIXES else ".png"

    def describe(self) -> str:
        """E.g. ``"400×400, crop, png"``."""
        text = f"{self.size}×{self.size}, {self.fit}, {self.format}"
        return text + (f" (JPEG quality {self.quality})" if self.format != "png" else "")

    def as_flags(self) -> str:
        text = f"--size {self.size} --fit {self.fit} --format {self.format}"
        return text + (f" --quality {self.quality}" if self.format != "png" else "")

    def recorded(self) -> dict:
        """The settings a resumed run must match (quality only where JPEG can be written)."""
        data = asdict(self)
        if self.format == "png":
            del data["quality"]
        return data


@dataclass(frozen=True)
class Job:
    """One image to prepare: read ``src``, write ``dst``."""

    src: Path
    dst: Path
    settings: Settings


@dataclass(frozen=True)
class JobResult:
    """What became of one :class:`Job`.

    Attributes:
        job: the job.
        error: ``None`` when the output was written, else a one-line reason.
        source_size: ``(width, height)`` of the upright source image, when it could be read.
    """

    job: Job
    error: Optional[str] = None
    source_size: Optional[tuple[int, int]] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Plan:
    """The work that :func:`plan_jobs` found; nothing has been written yet.

    Attributes:
        src, dst: the folders, as given.
        settings: the output settings.
        todo: jobs whose output does not exist yet.
        done: jobs whose output exists (from an earlier run); they are skipped.
        conflicts: ``(source, reason)`` of images left out because another source has the same output
            name (e.g. ``a.jpg`` and ``a.png`` both becoming ``a.png``).
    """

    src: Path
    dst: Path
    settings: Settings
    todo: list[Job] = field(default_factory=list)
    done: list[Job] = field(default_factory=list)
    conflicts: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def found(self) -> int:
        """Image files found under ``src``."""
        return len(self.todo) + len(self.done) + len(self.conflicts)

    def describe(self) -> str:
        """One line: what was found and what is left to do."""
        text = (f"{self.found} images under {self.src}: {len(self.todo)} to prepare, "
                f"{len(self.done)} already done")
        if self.conflicts:
            text += f", {len(self.conflicts)} left out (output name taken by another file)"
        return text + f"; writing {self.settings.describe()} to {self.dst}"


@dataclass
class Report:
    """The outcome of :func:`run_plan`.

    Attributes:
        plan: the plan that was run.
        written: jobs whose output this run wrote.
        failed: ``(source, reason)`` of every image without an output: unreadable files, write errors
            and name conflicts.
        upscaled: how many of the images written were smaller than the target and so were enlarged.
        seconds: wall time of the run.
        interrupted: the run was stopped (Ctrl-C) before the end; run it again to resume.
    """

    plan: Plan
    written: list[Job] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    upscaled: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def already_done(self) -> int:
        return len(self.plan.done)

    @property
    def ready(self) -> int:
        """Prepared images now in ``dst`` from this source: written now or before."""
        return len(self.written) + self.already_done

    def summary(self) -> str:
        """A few lines: counts, then the failures with their reasons."""
        plan = self.plan
        head = "interrupted" if self.interrupted else "done"
        lines = [f"{head} in {self.seconds:.1f} s: {self.ready} of {plan.found} images ready in {plan.dst} "
                 f"({plan.settings.describe()}): {len(self.written)} written now, {self.already_done} "
                 f"already done, {len(self.failed)} failed"]
        if self.upscaled:
            lines.append(f"note: {self.upscaled} of the images written were smaller than "
                         f"{plan.settings.size} px and were upscaled")
        if self.failed:
            lines.append(f"failed ({len(self.failed)}):")
            for path, reason in self.failed[:_MAX_LISTED]:
                lines.append(f"  {_relative(path, plan.src)}: {reason}")
            if len(self.failed) > _MAX_LISTED:
                lines.append(f"  and {len(self.failed) - _MAX_LISTED} more (all listed in "
                             f"{plan.dst / MANIFEST_NAME})")
        if self.interrupted:
            lines.append("run the same command again to finish: what is written is kept")
        return "\n".join(lines)


# -- planning ---------------------------------------------------------------

def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) if root.is_dir() else path.name
    except ValueError:
        return str(path)


def _inside(path: Path, folder: Path) -> bool:
    """Whether resolved ``path`` is ``folder`` or below it."""
    return path == folder or folder in path.parents


def _read_manifest(dst: Path) -> Optional[dict]:
    manifest = dst / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
            raise ValueError("no settings")
    except (OSError, ValueError) as exc:
        raise PrepareError(f"--dst {dst}: unreadable {MANIFEST_NAME} ({exc}); delete it only if the "
                           f"folder's images were all made with the flags you are passing") from None
    return data


def _check_dst(src: Path, dst: Path, settings: Settings) -> None:
    """Refuse a --dst that overlaps --src, holds foreign files, or another preparation."""
    src_real, dst_real = src.resolve(), dst.resolve()
    if _inside(dst_real, src_real):
        raise PrepareError(f"--dst {dst} is --src or lies inside it; the source is never written to: "
                           f"choose a folder outside {src}")
    if _inside(src_real, dst_real):
        raise PrepareError(f"--dst {dst} contains --src {src}; training on --dst would also read the raw "
                           f"images: choose a folder beside the source")
    if dst.exists() and not dst.is_dir():
        raise PrepareError(f"--dst {dst}: exists and is not a folder")
    manifest = _read_manifest(dst) if dst.is_dir() else None
    if manifest is None:
        if dst.is_dir() and any(not entry.name.startswith(".") for entry in dst.iterdir()):
            raise PrepareError(f"--dst {dst}: not empty and not made by datasets.prepare (no "
                               f"{MANIFEST_NAME}); choose a new or empty folder")
        return
    if manifest["settings"] != settings.recorded():
        old = manifest.get("flags") or manifest["settings"]
        raise PrepareError(f"--dst {dst} holds images prepared with {old}, not {settings.as_flags()}; "
                           f"pass those flags to resume it, or choose another --dst")
    if manifest.get("src") != str(src_real):
        raise PrepareError(f"--dst {dst} was prepared from --src {manifest.get('src')}, not {src_real}; "
                           f"pass that --src to resume it, or choose another --dst")


def plan_jobs(src: PathLike, dst: PathLike, size: int = 400, fit: str = "crop", format: str = "png",
              quality: int = 95) -> Plan:
    """Find the images under ``src`` and sort them into to-do and already-done; writes nothing.

    Args:
        src: a folder (searched recursively with :func:`~datasets.images.find_images`) or one image.
        dst: the output folder; each output mirrors its source's path relative to ``src``.
        size, fit, format, quality: see :class:`Settings` and the module docstring.

    Raises:
        PrepareError: bad settings, a missing ``src`` or one without images, or an unsuitable ``dst``
            (see the module docstring); the message names the flag.
    """
    settings = Settings(size=size, fit=fit, format=format, quality=quality)
    src, dst = Path(src), Path(dst)
    if not str(src).strip() or not str(dst).strip():
        raise PrepareError("--src and --dst must both be given")
    try:
        sources = find_images(src)
    except FileNotFoundError:
        raise PrepareError(f"--src {src}: no such file or folder") from None
    except NoImagesError as exc:
        raise PrepareError(f"--src {exc}") from None
    _check_dst(src, dst, settings)

    # A symlink inside src may lead into dst: its files are outputs, not sources.
    dst_real = dst.resolve()
    sources = [s for s in sources if not _inside(s.resolve(), dst_real)]
    plan = Plan(src=src, dst=dst, settings=settings)
    claimed: dict[Path, Path] = {}
    for source in sources:
        rel = source.relative_to(src) if src.is_dir() else Path(source.name)
        out = dst / rel.with_suffix(settings.output_suffix(source))
        if out in claimed:
            plan.conflicts.append((source, f"same output {_relative(out, dst)} as "
                                           f"{_relative(claimed[out], src)}; rename one of them"))
            continue
        claimed[out] = source
        job = Job(source, out, settings)
        (plan.done if out.is_file() else plan.todo).append(job)
    return plan


# -- one image --------------------------------------------------------------

def fit_image(img: Image.Image, size: int, fit: str) -> Image.Image:
    """``img`` (RGB) as ``size``×``size`` by ``fit`` (crop, pad or resize); Lanczos resampling."""
    if fit == "crop":
        return ImageOps.fit(img, (size, size), method=_RESAMPLE)
    if fit == "pad":
        return ImageOps.pad(img, (size, size), method=_RESAMPLE, color=_PAD_COLOR)
    if fit == "resize":
        return img.resize((size, size), _RESAMPLE)
    raise ValueError(f"fit must be one of {FITS}, got {fit!r}")


def _upscaled(width: int, height: int, size: int, fit: str) -> bool:
    side = {"crop": min(width, height), "pad": max(width, height)}.get(fit)
    return side < size if side is not None else min(width, height) < size


def _save_atomically(img: Image.Image, out: Path, quality: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        if out.suffix.lower() in _JPEG_SUFFIXES:
            img.save(tmp, format="JPEG", quality=quality, subsampling=0)
        else:
            img.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_one(job: Job) -> JobResult:
    """Read, fit and write one image. Never raises for a bad file: the reason goes in the result."""
    try:
        img = load_rgb(job.src)
    except ImageReadError as exc:
        return JobResult(job, error=exc.reason)
    source_size = img.size
    try:
        _save_atomically(fit_image(img, job.settings.size, job.settings.fit), job.dst, job.settings.quality)
    except OSError as exc:
        return JobResult(job, error=f"cannot write {job.dst} ({exc.strerror or exc})", source_size=source_size)
    return JobResult(job, source_size=source_size)


# -- the whole folder ---------------------------------------------------------

def _remove_stale_temporaries(dst: Path) -> int:
    """Delete the temporary files a killed run left in ``dst``; return how many."""
    removed = 0
    for dirpath, _, filenames in os.walk(dst):
        for name in filenames:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                Path(dirpath, name).unlink(missing_ok=True)
                removed += 1
    return removed


def _write_manifest(plan: Plan, report: Optional[Report] = None) -> None:
    data = {"settings": plan.settings.recorded(), "flags": plan.settings.as_flags(),
            "src": str(plan.src.resolve()), "made_by": "python -m datasets.prepare"}
    if report is not None:
        data.update(found=plan.found, ready=report.ready, complete=not (report.failed or report.interrupted),
                    failed={_relative(path, plan.src): reason for path, reason in report.failed})
    path = plan.dst / MANIFEST_NAME
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _ignore_sigint() -> None:
    # Workers leave Ctrl-C to the parent, which stops the pool and reports what was done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _results(jobs: Sequence[Job], workers: int) -> Iterable[JobResult]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(prepare_one, jobs)
        return
    workers = min(workers, len(jobs))
    # Small chunks keep the bar smooth and the load balanced; large enough to amortise the IPC.
    chunksize = max(1, min(32, len(jobs) // (workers * 16)))
    pool = multiprocessing.Pool(workers, initializer=_ignore_sigint)
    try:
        yield from pool.imap_unordered(prepare_one, jobs, chunksize=chunksize)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def run_plan(plan: Plan, workers: Optional[int] = None, progress: bool = True) -> Report:
    """Prepare every to-do image of ``plan``, in parallel, with a progress bar.

    Creates ``plan.dst``, records the settings in its ``.prepare.json`` before writing any image, removes
    temporary files a killed run left behind, and finally records the counts and the failures there.

    Args:
        plan: from :func:`plan_jobs`.
        workers: processes; ``None`` for one per CPU, 1 to work in this process.
        progress: show a tqdm bar (on stderr).

    Returns:
        A :class:`Report`. Ctrl-C stops the run cleanly: the report then has ``interrupted=True`` and
        what was written stays (an interrupted run is resumed by running it again).
    """
    from tqdm import tqdm

    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise PrepareError(f"--workers must be ≥ 1, got {workers}")
    start = time.perf_counter()
    report = Report(plan=plan, failed=list(plan.conflicts))
    plan.dst.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(plan.dst)
    _write_manifest(plan)
    bar = tqdm(total=len(plan.todo), unit="img", desc="prepare", dynamic_ncols=True, file=sys.stderr,
               disable=not progress or not plan.todo)
    results = _results(plan.todo, workers)
    try:
        for result in results:
            if result.ok:
                report.written.append(result.job)
                if _upscaled(*result.source_size, plan.settings.size, plan.settings.fit):
                    report.upscaled += 1
            else:
                report.failed.append((result.job.src, result.error))
            bar.update()
    except KeyboardInterrupt:
        report.interrupted = True
        results.close()  # stops the pool now, so no worker is still writing
        _remove_stale_temporaries(plan.dst)
        # Workers may have finished images whose results never arrived; what is on disk is complete.
        report.written = [job for job in plan.todo if job.dst.is_file()]
    finally:
        results.close()
        bar.close()
    # Results arrive in completion order; list them in source order.
    report.written.sort(key=lambda job: job.src)
    report.failed.sort(key=lambda item: item[0])
    report.seconds = time.perf_counter() - start
    _write_manifest(plan, report)
    return report


def prepare_folder(src: PathLike, dst: PathLike, size: int = 400, fit: str = "crop", format: str = "png",
                   quality: int = 95, workers: Optional[int] = None, progress: bool = True) -> Report:
    """:func:`plan_jobs` then :func:`run_plan`: prepare every image under ``src`` into ``dst``."""
    return run_plan(plan_jobs(src, dst, size=size, fit=fit, format=format, quality=quality),
                    workers=workers, progress=progress)


# -- looking at the result ------------------------------------------------------

def sample_pairs(plan: Plan, count: int = 4) -> list[tuple[Path, Path]]:
    """Up to ``count`` (source, output) pairs whose output exists, spread evenly over the folder."""
    jobs = sorted((job for job in plan.todo + plan.done if job.dst.is_file()), key=lambda job: job.src)
    if len(jobs) > count:
        jobs = [jobs[(2 * k + 1) * len(jobs) // (2 * count)] for k in range(count)]
    return [(job.src, job.dst) for job in jobs]


def before_after(pairs: Iterable[tuple[PathLike, PathLike]], height: int = 160) -> Image.Image:
    """One picture: a row per pair, the source (left) beside its output (right), each ``height`` px tall
    and labelled with its size in pixels. Unreadable files show as a grey box."""
    rows = []
    for before, after in pairs:
        row = []
        for path in (before, after):
            try:
                img = load_rgb(path)
                label = f"{img.width}x{img.height}"
            except ImageReadError as exc:
                img, label = Image.new("RGB", (height, height), (128, 128, 128)), exc.reason[:30]
            thumb = img.resize((max(1, round(img.width * height / img.height)), height), _RESAMPLE)
            ImageDraw.Draw(thumb).text((4, 4), label, fill=(255, 255, 0), stroke_width=1,
                                       stroke_fill=(0, 0, 0))
            row.append(thumb)
        rows.append(row)
    if not rows:
        raise ValueError("before_after: no pairs to show")
    gap = 8
    left = max(row[0].width for row in rows)
    width = left + gap + max(row[1].width for row in rows)
    sheet = Image.new("RGB", (width, len(rows) * (height + gap) - gap), (255, 255, 255))
    for i, (before, after) in enumerate(rows):
        top = i * (height + gap)
        sheet.paste(before, (left - before.width, top))
        sheet.paste(after, (left + gap, top))
    return sheet


# -- command line -----------------------------------------------------------------

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True,
                   help="folder of source images, searched recursively (e.g. mirflickr/ or "
                        "metfaces-dataset/images/); only read")
    p.add_argument("--dst", required=True,
                   help="output folder, created if needed; mirrors the paths under --src")
    p.add_argument("--size", type=_int, default=400, help="side of the square outputs in pixels (default 400)")
    p.add_argument("--fit", default="crop", choices=FITS,
                   help="crop: short side to SIZE, centre square; pad: long side to SIZE, black borders; "
                        "resize: ignore the aspect ratio (default crop)")
    p.add_argument("--format", default="png", choices=FORMATS,
                   help="png: lossless; jpg: JPEG at --quality; same: JPEG sources stay JPEG, the rest "
                        "PNG (default png)")
    p.add_argument("--quality", type=_int, default=95, help="JPEG quality, 1-100 (default 95)")
    p.add_argument("--workers", type=_int, default=None,
                   help=f"processes (default: one per CPU, here {os.cpu_count()})")
    p.add_argument("--dry_run", action="store_true", help="say what would be done and stop")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status: 0 when at least one image is ready (failures are
    listed), 1 when none is, 2 for bad input, 130 when interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.workers is not None and args.workers < 1:
            raise PrepareError(f"--workers must be ≥ 1, got {args.workers}")
        plan = plan_jobs(args.src, args.dst, size=args.size, fit=args.fit, format=args.format,
                         quality=args.quality)
        print(plan.describe(), flush=True)
        if args.dry_run:
            return 0
        report = run_plan(plan, workers=args.workers, progress=not args.no_progress)
    except (PrepareError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), flush=True)
    if report.interrupted:
        return 130
    return 0 if report.ready else 1


if __name__ == "__main__":
    # Run the imported module's main, so that worker processes pickle datasets.prepare.prepare_one
    # rather than __main__.prepare_one (which spawned workers could not find).
    from datasets.prepare import main as _main
    sys.exit(_main())
