"""A model card's product section: what stamp.py and scan.py do to photos sent through the platforms' pipelines.

    python -m report.product_card pretrained_models/rs_aug results/product/rs_aug \
        [--certify results/product/rs_aug_certify.jsonl]
    python -m report.product_card --readme results/product/baseline results/product/rs_aug ...   # README tables

Reads an evaluate.py --product output folder (results.json with "product", product.md, visibility.png) and, with
--certify, the JSON lines of `scan.py --certify --json` on photos; writes the section at the top of MODEL/README.md
(replacing an earlier one and the card's old calibration line), copies the visibility figure beside the card, and
labels the card's evaluate.py tables as the paper's diagnostics. Nothing is measured here.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
from pathlib import Path

HEADING = "## The product: stamp.py → platform pipelines → scan.py"
DIAGNOSTICS = "## evaluate.py: the paper's tables (diagnostics)"
DIAGNOSTICS_NOTE = ("These tables judge tensors at the working size by the argmax (plain) or by PREDICT at ½ (smoothed), "
                    "not by scan.py's calibrated rule; the product section above is what the tools do to files.")
FIGURE = "visibility.png"


def certificate_lines(path: Path) -> list[str]:
    """Summary lines of `scan.py --certify --json` records: per verdict, how many were certified, at which radii."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: no scan.py records")
    n = next((r["certify_n"] for r in records if "certify_n" in r), "?")
    lines = [f"Certificates at the shipped rule, `scan.py --certify` (n {n} "
             f"fresh copies per photo, alpha 0.001; radius in [0,1] pixel units at the working size), on "
             f"{len(records)} bsds400 photos:", ""]
    for verdict in ("stamped", "clean"):
        group = [r for r in records if r["verdict"] == verdict]
        if not group:
            continue
        radii = [r["radius"] if r["certified"] else 0.0 for r in group]
        at = {r: sum(x >= r for x in radii) for r in (0.25, 0.5)}
        lines.append(f"- {len(group)} photos read {verdict}: {sum(1 for r in group if r['certified'])} certified; "
                     f"median radius {statistics.median(radii):.3f} (largest {max(radii):.3f}); certified at r ≥ 0.25: "
                     f"{at[0.25]}, at r ≥ 0.5: {at[0.5]}")
    return lines + [""]


def product_section(eval_dir: Path, certify: Path | None = None) -> str:
    results = json.loads((eval_dir / "results.json").read_text())
    product, argv = results["product"], results["settings"].get("argv") or []
    s = product["settings"]
    cal_path = Path(s["model"]) / "calibration.json"
    lines = [HEADING, "",
             "Every figure here is what the tools do to files: photos stamped by stamp.py's code at their own "
             "resolution, saved as 8-bit files, sent through each platform pipeline (real libjpeg and libwebp, "
             "Pillow's resampling), and judged by scan.py's code at its defaults, the shipped calibration's rule "
             "(the verdicts of clean photos too). Counts are photos, with exact 95% intervals.", "",
             "```", f"python evaluate.py {shlex.join(argv)}", "```", ""]
    if cal_path.is_file():
        cal = json.loads(cal_path.read_text())
        rule = (f"sequential PREDICT (n ≤ {cal['n']}, alpha {cal['alpha']:g}) on the votes of noisy copies whose logit "
                f"margin is above m = {cal['margin']:.4g}, vote threshold ½" if cal["judge"] == "smoothed"
                else f"logit margin > {cal['threshold']:.4g}")
        lines += [f"**Shipped rule** (`calibration.json`): {rule}; chosen on {cal['n_clean']} clean and stamped "
                  f"photos after all {len(cal['chosen_on']['pipelines'])} pipelines, then verified under that rule: "
                  f"{cal['false_positives']} of {cal['n_clean']} clean photos flagged after any pipeline (FPR ≤ "
                  f"{100 * cal['fpr_upper_bound']:.2f}% with 95% confidence: "
                  f"{'backs' if cal['backed'] else 'does not back'} FPR ≤ {100 * cal['target_fpr']:g}%), "
                  f"{100 * cal['tpr']:.1f}% of stamped photos caught as stamped.", ""]
    if certify is not None:
        lines += certificate_lines(certify)
    if product.get("lpips"):
        lines += [f"LPIPS (AlexNet) at 1×: {product['lpips']['mean']:.4f} over {product['lpips']['n']} photos.", ""]
    else:
        lines += ["LPIPS: not measured (torchvision's AlexNet weights are not on this machine).", ""]
    if (eval_dir / FIGURE).is_file():
        lines += [f"The flattest regions of the 4 photos with the lowest flat-block PSNR, at 100% "
                  f"(clean | stamped | residual ×10): ![visibility]({FIGURE})", ""]
    tables = (eval_dir / "product.md").read_text().strip().split("\n", 1)[1].lstrip()  # without its heading
    lines.append(tables.replace("\n### ", "\n#### "))
    return "\n".join(lines).rstrip() + "\n"


def update_card(model_dir: Path, eval_dir: Path, certify: Path | None = None) -> Path:
    card_path = model_dir / "README.md"
    card = card_path.read_text()
    section = product_section(eval_dir, certify)
    if HEADING in card:  # replace the earlier product section, up to the next level-2 heading
        start = card.index(HEADING)
        end = card.find("\n## ", start + len(HEADING))
        card = card[:start] + card[end + 1:] if end >= 0 else card[:start]
    # the old calibration line (a threshold chosen by evaluate.py's detection stage) no longer describes the file
    card = "\n".join(line for line in card.split("\n") if not line.startswith("`calibration.json`: scan.py's threshold"))
    if "\n## evaluate.py\n" in card:
        card = card.replace("\n## evaluate.py\n", f"\n{DIAGNOSTICS}\n\n{DIAGNOSTICS_NOTE}\n", 1)
    at = card.find("\n## ")
    card = card[:at + 1] + section + "\n" + card[at + 1:] if at >= 0 else card + "\n" + section
    if (eval_dir / FIGURE).is_file():
        shutil.copyfile(eval_dir / FIGURE, model_dir / FIGURE)
    tmp = card_path.with_name(card_path.name + ".tmp")
    tmp.write_text(card)
    tmp.replace(card_path)
    return card_path


def _caught(row: dict | None) -> str:
    if row is None:  # a pipeline this model's stage did not run (--product_pipelines short)
        return "–"
    c = row["stamped_caught"]
    return f"{100 * c['rate']:.1f}" if c["rate"] is not None else "–"


def readme_tables(eval_dirs: list[Path]) -> str:
    """The README's tables from several product-stage folders: one row per model (rule, visibility, clean photos
    flagged, speed), then the share of stamped photos caught after each pipeline at each size, one column each."""
    runs = []
    for d in eval_dirs:
        product = json.loads((Path(d) / "results.json").read_text())["product"]
        runs.append((Path(product["settings"]["model"]).relative_to("pretrained_models").as_posix(), product))
    lines = ["| model | scan.py's rule (shipped calibration) | PSNR dB (1×) | flat-block PSNR dB: mean, worst photo | "
             "clean photos flagged after any pipeline | s / verdict (median, 1×) |", "|---|---|---:|---:|---:|---:|"]
    for name, p in runs:
        s, one = p["settings"], p["sizes"]["1×"]
        rule = (f"votes of 'margin > {s['margin']:.3g}' > ½, σ {s['sigma']:g}, n ≤ {s['n']}" if s["judge"] == "smoothed"
                else f"margin > {s['threshold']:.3g}")
        v, flat = one["visibility"], one["visibility"]["psnr_flat"]
        flagged = ", ".join(f"{size} {b['clean_flagged_any']['k']}/{b['clean_flagged_any']['n']}"
                            for size, b in p["sizes"].items())
        seconds = statistics.median(r["seconds_per_verdict"]["median"] for r in one["rows"].values())
        lines.append(f"| `{name}` | {rule} | {v['psnr']['mean']:.2f} | {flat['mean']:.2f}, {flat['worst']['value']:.2f} "
                     f"| {flagged} | {seconds:.3f} |")
    sizes = list(runs[0][1]["sizes"])
    columns = [(name, size) for name, p in runs for size in sizes if size in p["sizes"]]
    lines += ["", "Stamped photos caught (%), by pipeline, photo size and model (photos: "
              + ", ".join(f"{size} {runs[0][1]['sizes'][size]['photos']}" for size in sizes) + "):", "",
              "| pipeline | " + " | ".join(f"`{name}` {size}" for name, size in columns) + " |",
              "|---|" + "---:|" * len(columns)]
    for pipeline in runs[0][1]["sizes"]["1×"]["rows"]:
        lines.append(f"| {pipeline} | " + " | ".join(
            _caught(dict(runs)[name]["sizes"][size]["rows"].get(pipeline)) for name, size in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, nargs="?", help="the model folder whose README.md gets the section")
    p.add_argument("eval", type=Path, nargs="?", help="an evaluate.py --product output folder (results.json, product.md)")
    p.add_argument("--certify", type=Path, default=None, help="JSON lines of scan.py --certify --json on photos")
    p.add_argument("--readme", type=Path, nargs="+", default=None, metavar="EVAL_DIR",
                   help="print the README's tables from these product-stage folders instead")
    args = p.parse_args(argv)
    try:
        if args.readme:
            print(readme_tables(args.readme), end="")
            return
        if args.model is None or args.eval is None:
            p.error("give MODEL and EVAL (or --readme EVAL_DIR ...)")
        path = update_card(args.model, args.eval, args.certify)
    except (FileNotFoundError, KeyError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"wrote the product section of {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
