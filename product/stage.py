"""The product stage: what stamp.py and scan.py do to photos sent through the platforms' pipelines.

Photos of any size → stamped at their own resolution exactly as stamp.py stamps (product.stamping.stamp_pixels)
→ 8-bit pixels → each platform pipeline (product.pipelines: real codecs and resampling on the file) → judged
as scan.py judges (product.scanning.PhotoScanner: its rule, threshold, n, alpha, looks and seed). The clean
photos go through the same. Per photo size and pipeline: clean photos read clean, flagged, abstained, stamped
photos caught, missed, abstained, each counted as photos with an exact 95% interval, and the seconds scan.py
spent per verdict. Sizes are the photos' own (1×) and Lanczos rescales of the first photos (½×: small web
images and thumbnails; 2× and 4×: larger than the working size, so that stamp.py's round trip through the
working resolution is measured). Visibility (report.visibility: PSNR over flat blocks) is measured at each size.

With `calibrate`, the stage first chooses the rule's threshold on the 1× photos as they were stamped (a plain
scanner: its logit margin; a smoothed one: the median logit margin over noisy copies, which sets the margin m
of its base classifier, the vote threshold staying ½), then judges everything under that rule; its "as stamped"
row at 1× is the calibration's verification under scan.py's own rule (calibration_record).
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from report import visibility
from report.calibration import clopper_pearson, fpr_upper_bound, operating_point

from . import pipelines
from .files import pixels_to_tensor, read_pixels
from .scanning import PLAIN_SCORE, RULE, SMOOTHED_SCORE, PhotoScanner, Rule
from .stamping import fit_pixels, stamp_pixels

#: the photo sizes, by name: a factor on each side (Lanczos)
SIZE_NAMES = {0.5: "½×", 1.0: "1×", 2.0: "2×", 4.0: "4×"}


def size_name(factor: float) -> str:
    return SIZE_NAMES.get(factor, f"{factor:g}×")


@dataclass
class StageSettings:
    """sizes: factors on each side (1 = the photos as they are); other_photos: how many photos (the first ones)
    are rescaled to each size other than 1× (None: all); pipelines: names in product.pipelines.PIPELINES;
    calibrate: choose the rule on the 1× photos first; calibration_copies: noisy copies per photo for a smoothed
    scanner's calibration score; target_fpr: the false-positive rate the calibration holds."""

    sizes: tuple[float, ...] = (1.0, 0.5, 2.0, 4.0)
    other_photos: int | None = 50
    pipelines: tuple[str, ...] = tuple(pipelines.PIPELINES)
    calibrate: bool = False
    calibration_copies: int = 16
    target_fpr: float = 0.01


def rescale(pixels: np.ndarray, factor: float) -> np.ndarray:
    """(H,W,3) uint8 with each side × factor (Lanczos, antialiased when shrinking); the photo itself at 1."""
    if factor == 1:
        return pixels
    h, w = pixels.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS)).copy()


def rate(k: int, n: int) -> dict:
    """k of n photos with its share and exact (Clopper–Pearson) 95% interval."""
    low, high = clopper_pearson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": [low, high]}


class ProductStage:
    """Runs the stage for one model: `scanner` (a PhotoScanner, holding the encoder) on `paths`."""

    def __init__(self, scanner: PhotoScanner, paths: list[Path], settings: StageSettings, log=print,
                 lpips_model=None):
        if scanner.encoder is None:
            raise ValueError(f"{scanner.model_dir} holds a scanner only: the product stage needs an encoder to stamp")
        self.scanner, self.paths, self.settings, self.log = scanner, list(paths), settings, log
        self.lpips = lpips_model
        self.encoder = scanner.encoder
        self.fit = self.encoder.input_size  # the original's encoder: stamped copies are written at 400×400
        self.working_size = 0 if self.fit else scanner.settings.working_size
        self.names = pipelines.select(settings.pipelines)
        self.unreadable: dict[str, str] = {}  # path → why it could not be read

    # ------------------------------------------------------------------ photos
    def _paths(self, factor: float) -> list[Path]:
        """All the photos at 1×; the first `other_photos` of them at every other size."""
        other = self.settings.other_photos
        return self.paths if factor == 1 or other is None else self.paths[:other]

    def _photos(self, factor: float):
        """Yield (name, clean, stamped) uint8 at size `factor`, stamped exactly as stamp.py stamps; an unreadable
        photo is skipped and recorded."""
        for path in self._paths(factor):
            try:
                clean = rescale(read_pixels(path), factor)
            except ValueError as e:
                self.unreadable[str(path)] = getattr(e, "reason", None) or str(e)
                continue
            if self.fit:
                clean = fit_pixels(clean, self.fit)
            stamped, _ = stamp_pixels(self.encoder, clean, self.working_size)
            yield path.name, clean, stamped

    # ------------------------------------------------------------------ calibration
    def calibrate(self) -> dict:
        """Choose the rule on the 1× photos, as the platform sees them: every clean and every stamped photo through
        every pipeline of the stage is scored (a plain scanner: its logit margin; a smoothed one: the median
        logit margin over `calibration_copies` noisy copies). A clean photo's score is its highest over the
        pipelines (it counts as flagged when any received copy of it would be), and report.calibration's
        operating_point puts the threshold for the target FPR between the highest clean score it allows and the
        next higher score, clean or stamped. Sets the rule on the scanner; returns what was chosen, with every
        score (so that a threshold can be chosen again without judging the photos again)."""
        s, sc = self.settings, self.scanner
        smoothed = sc.sigma is not None
        clean_scores, stamped_scores, photos = [], [], []
        bar = tqdm(total=len(self._paths(1.0)), desc="calibrate", unit="photo", file=sys.stderr, dynamic_ncols=True,
                   leave=False)
        for photo, clean, stamped in self._photos(1.0):
            row = {}
            for kind, pixels in (("clean", clean), ("stamped", stamped)):
                row[kind] = [self._score(pipelines.apply(p, pixels)) for p in self.names]
            clean_scores.append(max(row["clean"]))
            stamped_scores += row["stamped"]
            photos.append({"photo": photo, **row})
            bar.update()
        bar.close()
        point = operating_point(torch.tensor(clean_scores), torch.tensor(stamped_scores), s.target_fpr)
        chosen = point["threshold"]
        how = (f"median logit margin over {s.calibration_copies} noisy copies (σ {sc.sigma})" if smoothed
               else "logit margin") + " of each photo after each pipeline; a clean photo's highest over the pipelines"
        self.choice = {"score": how, "chosen": chosen, "gap": point["gap"],
                       "copies": s.calibration_copies if smoothed else None, "pipelines": list(self.names),
                       "operating_point": point, "photo_scores": photos}
        rule = Rule(0.5 if smoothed else chosen, chosen if smoothed else 0.0, "calibration",
                    f"calibrated here, FPR ≤ {100 * s.target_fpr:g}%")
        sc.set_rule(rule, self.log)
        self.log(f"calibrated on {len(clean_scores)} clean and stamped photos through {len(self.names)} pipelines: "
                 + (f"margin m {chosen:.4g} (vote threshold ½)" if smoothed else f"threshold {chosen:.4g}")
                 + f", between {point['gap'][0]:.4g} and {point['gap'][1]:.4g} ({how})")
        return self.choice

    def _score(self, pixels: np.ndarray) -> float:
        x = self.scanner.prepare(pixels)
        if self.scanner.sigma is None:
            return self.scanner.judge_tensor(x)[1]
        return float(self.scanner.noisy_margins(x, self.settings.calibration_copies).median())

    # ------------------------------------------------------------------ the stage
    def run(self) -> dict:
        """Calibrate (if asked), then judge every photo size → the stage's results (settings, calibration, one
        block per size, LPIPS, unreadable photos, seconds)."""
        t0 = time.time()
        calibration = self.calibrate() if self.settings.calibrate else None
        self.lpips_values = []
        sizes = {size_name(f): block for f in self.settings.sizes if (block := self._judge_size(f)) is not None}
        return {"settings": self._settings(), "calibration": calibration, "sizes": sizes,
                "lpips": ({"mean": float(np.mean(self.lpips_values)), "n": len(self.lpips_values)}
                          if self.lpips_values else None),
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable.items()],
                "seconds": round(time.time() - t0, 1)}

    def _judge_size(self, factor: float) -> dict | None:
        """Every photo at size `factor`, clean and stamped, through every pipeline, judged by scan.py's judge →
        the size's block (None when no photo could be read)."""
        sc = self.scanner
        counts = {p: {"clean": [], "stamped": [], "seconds": [], "copies": []} for p in self.names}
        per_photo, photo_names, long_sides = [], [], []
        flagged_any = abstained_any = 0  # clean photos flagged (abstained on) after at least one pipeline
        bar = tqdm(total=len(self._paths(factor)), desc=f"product {size_name(factor)}", unit="photo",
                   file=sys.stderr, dynamic_ncols=True, leave=False)
        for photo, clean, stamped in self._photos(factor):
            per_photo.append(visibility.photo_visibility(clean, stamped))
            photo_names.append(photo)
            long_sides.append(max(clean.shape[:2]))
            if factor == 1 and self.lpips is not None:
                self.lpips_values.append(self._lpips(clean, stamped))
            for pipeline in self.names:
                row = counts[pipeline]
                for kind, pixels in (("clean", clean), ("stamped", stamped)):
                    received = pipelines.apply(pipeline, pixels)
                    start = time.perf_counter()
                    result = sc.judge_pixels(received)
                    row["seconds"].append(time.perf_counter() - start)
                    row[kind].append(result["verdict"])
                    if sc.sigma is not None:
                        row["copies"].append(result["n_used"])
            clean_verdicts = [counts[p]["clean"][-1] for p in self.names]
            flagged_any += "stamped" in clean_verdicts
            abstained_any += "abstain" in clean_verdicts
            bar.update()
        bar.close()
        if not per_photo:
            return None
        return {"factor": factor, "photos": len(per_photo),
                "long_side": {"min": min(long_sides), "median": statistics.median(long_sides), "max": max(long_sides)},
                "visibility": visibility.summarize(per_photo, photo_names),
                "worst": [photo_names[i] for i in visibility.worst_photos(per_photo, photo_names)],
                "clean_flagged_any": rate(flagged_any, len(per_photo)),
                "clean_abstained_any": rate(abstained_any, len(per_photo)),
                "rows": {p: self._row(counts[p]) for p in self.names},
                # every verdict, one letter per photo (s stamped, c clean, a abstain), in `names` order
                "names": photo_names,
                "verdicts": {p: {kind: "".join(v[0] for v in counts[p][kind]) for kind in ("clean", "stamped")}
                             for p in self.names}}

    def figure(self, results: dict, path: Path) -> Path | None:
        """The 4 worst photos at 1× by flat-block PSNR: 100% crops of their flattest regions, clean | stamped |
        residual ×10 (report.visibility.visibility_figure); None when no photo was judged at 1×."""
        block = results["sizes"].get("1×")
        if block is None:
            return None
        by_name = {p.name: p for p in self.paths}
        examples = []
        for name in block["worst"]:
            clean = read_pixels(by_name[name])
            clean = fit_pixels(clean, self.fit) if self.fit else clean
            examples.append((name, clean, stamp_pixels(self.encoder, clean, self.working_size)[0]))
        return visibility.visibility_figure(examples, path, title=f"{results['settings']['model']}: the flattest "
                                                                  f"regions of the 4 worst photos, at 100%")

    def _lpips(self, clean, stamped) -> float:
        device = next(self.lpips.parameters()).device
        a, b = pixels_to_tensor(clean, device), pixels_to_tensor(stamped, device)
        with torch.no_grad():
            return float(self.lpips(b, a, normalize=True).mean())

    @staticmethod
    def _row(c: dict) -> dict:
        clean, stamped = c["clean"], c["stamped"]
        row = {"clean_read_clean": rate(clean.count("clean"), len(clean)),
               "clean_flagged": rate(clean.count("stamped"), len(clean)),
               "clean_abstained": rate(clean.count("abstain"), len(clean)),
               "stamped_caught": rate(stamped.count("stamped"), len(stamped)),
               "stamped_missed": rate(stamped.count("clean"), len(stamped)),
               "stamped_abstained": rate(stamped.count("abstain"), len(stamped)),
               "seconds_per_verdict": {"median": statistics.median(c["seconds"]),
                                       "mean": statistics.fmean(c["seconds"])}}
        if c["copies"]:
            row["copies_per_verdict"] = {"mean": statistics.fmean(c["copies"]),
                                         "median": statistics.median(c["copies"]), "max": max(c["copies"])}
        return row

    def _settings(self) -> dict:
        sc = self.scanner
        return {"model": str(sc.model_dir), "rule": RULE, "judge": "smoothed" if sc.sigma is not None else "plain",
                "score": SMOOTHED_SCORE if sc.sigma is not None else PLAIN_SCORE, "sigma": sc.sigma,
                "threshold": sc.rule.value, "margin": sc.rule.margin if sc.sigma is not None else None,
                "threshold_source": sc.rule.source, "threshold_text": sc.rule.text,
                "n": sc.n if sc.sigma is not None else None, "alpha": sc.alpha, "sequential": sc.sequential,
                "seed": sc.seed, "working_size": None if self.fit else self.working_size, "fitted_to": self.fit,
                "photos": len(self.paths), "other_photos": self.settings.other_photos,
                "sizes": [size_name(f) for f in self.settings.sizes],
                "pipelines": {p: pipelines.describe(p) for p in self.names},
                "judge_text": sc.describe(), "threads": torch.get_num_threads()}


def calibration_record(results: dict, target_fpr: float = 0.01, **extra) -> dict:
    """calibration.json for scan.py from a calibrating stage's results: the rule, the values chosen, and their
    verification under that rule at 1×: the clean photos flagged after at least one pipeline (their exact
    one-sided 95% bound backs the target or not), and the stamped photos caught as stamped."""
    s, choice = results["settings"], results["calibration"]
    if choice is None:
        raise ValueError("calibration_record: the stage did not calibrate (StageSettings.calibrate)")
    block = results["sizes"]["1×"]
    row = block["rows"]["as stamped"]
    flagged, n_clean = block["clean_flagged_any"]["k"], block["clean_flagged_any"]["n"]
    caught = row["stamped_caught"]
    upper = fpr_upper_bound(flagged, n_clean)
    return {"rule": RULE, "score": s["score"], "judge": s["judge"], "sigma": s["sigma"],
            "threshold": s["threshold"], "margin": s["margin"], "n": s["n"], "alpha": s["alpha"],
            "sequential": s["sequential"] if s["judge"] == "smoothed" else None, "working_size": s["working_size"], "fitted_to": s["fitted_to"],
            "target_fpr": target_fpr,
            "chosen_on": {k: v for k, v in choice.items() if k not in ("operating_point", "photo_scores")},
            "n_clean": n_clean, "false_positives": flagged, "clean_abstained": block["clean_abstained_any"]["k"],
            "false_positives_counted": "clean photos flagged after at least one of the pipelines "
                                       + ", ".join(block["rows"]),
            "fpr": flagged / n_clean if n_clean else math.nan, "fpr_upper_bound": upper,
            "backed": upper <= target_fpr, "clean_needed": choice["operating_point"]["clean_needed"],
            "n_stamped": caught["n"], "tpr": caught["rate"], "tpr_ci": caught["ci95"],
            "stamped_abstained": row["stamped_abstained"]["k"], "seed": s["seed"], **extra}


def product_summary(results: dict) -> str:
    """A few lines for the end of a run: per size, the worst pipeline for each side, PSNR and seconds."""
    lines = []
    for name, block in results["sizes"].items():
        rows = block["rows"]
        worst = min(rows, key=lambda p: rows[p]["stamped_caught"]["rate"])
        flagged = max(rows, key=lambda p: rows[p]["clean_flagged"]["k"])
        seconds = statistics.median(r["seconds_per_verdict"]["median"] for r in rows.values())
        flat = block["visibility"]["psnr_flat"]
        lines.append(f"   {name} ({block['photos']} photos): stamped caught ≥ {_pct(rows[worst]['stamped_caught'])} "
                     f"(worst: {worst}); clean flagged ≤ {_pct(rows[flagged]['clean_flagged'])}; PSNR "
                     f"{block['visibility']['psnr']['mean']:.2f} dB"
                     + (f", flat blocks {flat['mean']:.2f} dB" if flat.get("n") else "")
                     + f"; {seconds:.3f} s per verdict")
    return "\n".join(lines)


def _pct(r: dict) -> str:
    return "–" if r["rate"] is None else f"{r['k']}/{r['n']} ({100 * r['rate']:.1f}%)"


def render(results: dict) -> str:
    """The stage's tables in Markdown: one per photo size, one row per pipeline."""
    s = results["settings"]
    rule = (f"smoothed (σ {s['sigma']}): sequential PREDICT on the votes of 'margin > {s['margin']:.4g}', vote "
            f"threshold {s['threshold']:.4g}, n ≤ {s['n']}, alpha {s['alpha']:g}" if s["judge"] == "smoothed"
            else f"plain: logit margin > {s['threshold']:.4g}")
    size = f"fitted to {s['fitted_to']}" if s["fitted_to"] else f"working size {s['working_size']}"
    lines = [f"## Product stage: stamp.py → platform pipeline → scan.py ({s['model']})", "",
             f"Rule: {rule} ({s['threshold_text']}); {size}; noise seed {s['seed']}; {s['threads']} threads.", ""]
    for name, block in results["sizes"].items():
        v = block["visibility"]
        flat = v["psnr_flat"]
        worst = flat.get("worst") or {}
        lines += [f"### {name}: {block['photos']} photos, long side {block['long_side']['min']}–"
                  f"{block['long_side']['max']} px",
                  "", f"PSNR {v['psnr']['mean']:.2f} ± {v['psnr']['std']:.2f} dB; over flat 16×16 blocks "
                  + (f"{flat['mean']:.2f} ± {flat['std']:.2f} dB ({flat['n']} photos with flat blocks; worst "
                     f"{worst.get('name')}: {worst.get('value', math.nan):.2f} dB)" if flat.get("n") else "n/a"),
                  "", f"Clean photos flagged after at least one pipeline: {_pct(block['clean_flagged_any'])}; "
                      f"abstained on after at least one: {_pct(block['clean_abstained_any'])}.",
                  "", "| pipeline | clean read clean | clean flagged | stamped caught (95% CI) | stamped abstained "
                      "| s / verdict |", "|---|---:|---:|---:|---:|---:|"]
        for pipeline, row in block["rows"].items():
            c = row["stamped_caught"]
            ci = f"{100 * c['ci95'][0]:.1f}–{100 * c['ci95'][1]:.1f}"
            lines.append(f"| {pipeline} | {_pct(row['clean_read_clean'])} | {_pct(row['clean_flagged'])} | "
                         f"{_pct(c)} [{ci}] | {row['stamped_abstained']['k']} | "
                         f"{row['seconds_per_verdict']['median']:.3f} |")
        lines.append("")
    lines.append("Pipelines: " + "; ".join(f"*{p}*: {d}" for p, d in s["pipelines"].items()) + ".")
    return "\n".join(lines) + "\n"
