"""results.json → tables.md and CSV files, in the paper's layout (Table 1 detection, Table 2
imperceptibility, Table 3 adversarial robustness), plus calibration, forgery and certification.

Everything here reads the results dict that evaluate.py writes as results.json, so the markdown, the CSVs
and the JSON cannot disagree.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

PAPER_NOTE = ("The paper's published numbers are not reproduced beside ours: this environment is offline and "
              "the original repository shows them only as figures (figs/accuricies.png, figs/psnr_ssim.png, "
              "figs/adversarial_robustness.png in xinghua-qu/DeepRAFT).")


def pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def num(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table1_rows(results: dict) -> list[dict]:
    return [{"condition": name, **row} for name, row in results["table1"].items()]


def table1_md(results: dict) -> str:
    if any("fpr" in r for r in table1_rows(results)):  # a scanner-only model: clean photos only
        rows = [[r["condition"], pct(r["acc_clean"]), pct(r["fpr"]), pct(r["abstain"]), str(r["n"])]
                for r in table1_rows(results)]
        return _table(["condition", "clean read as clean %", "false positives %", "abstained %", "photos"], rows)
    rows = [[r["condition"], pct(r["acc_clean"]), pct(r["acc_stamped"]), pct(r["acc"]), pct(r["abstain"]),
             num(r["auc"], 4)] for r in table1_rows(results)]
    return _table(["condition", "clean %", "stamped %", "overall %", "abstained %", "ROC-AUC"], rows)


def table2_rows(results: dict) -> list[dict]:
    rows = []
    for metric, stats in results["table2"].items():
        if isinstance(stats, dict) and "mean" in stats:
            rows.append({"metric": metric, **stats})
    return rows


def table2_md(results: dict) -> str:
    digits = {"psnr": 2, "ssim": 4, "lpips": 4}
    rows = []
    for r in table2_rows(results):
        d = digits.get(r["metric"], 4)
        value = "n/a" if r["n"] == 0 else f"{num(r['mean'], d)} ± {num(r['std'], d)}"
        rows.append([{"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}.get(r["metric"], r["metric"]),
                     value, str(r["n"])])
    text = _table(["metric", "mean ± std", "photos"], rows)
    if results["table2"].get("lpips_note"):
        text += f"\n\nLPIPS: {results['table2']['lpips_note']}"
    return text


def table3_rows(results: dict) -> list[dict]:
    rows = []
    table3 = results.get("table3") or {}
    for attack, by_eps in table3.get("attacks", {}).items():
        for row in by_eps.values():
            rows.append({"attack": attack, "eps_255": row["eps"] * 255, **row})
    return rows


def table3_md(results: dict) -> str:
    t3 = results["table3"]
    none = t3["no_attack"]
    rows = [["no attack", "0", pct(none["acc_clean"]), pct(none["acc_stamped"]), pct(none["acc"]), "–", "–"]]
    for r in table3_rows(results):
        rows.append([r["attack"], f"{r['eps_255']:g}/255", pct(r.get("acc_clean")), pct(r.get("acc_stamped")),
                     pct(r.get("acc")), pct(r.get("forgery_success")), pct(r.get("removal_success"))])
    return _table(["attack", "ε (L∞)", "clean %", "stamped %", "overall %", "forgery success %",
                   "removal success %"], rows, "llrrrrr")


def calibration_md(results: dict) -> str:
    rows = []
    for point in results["calibration"]["operating_points"]:
        lo, hi = point["tpr_ci"]
        rows.append([f"{100 * point['target_fpr']:g}%", num(point["threshold"], 4),
                     f"{pct(point['fpr'])} (≤ {pct(point['fpr_upper_bound'])})",
                     f"{pct(point['tpr'])} [{pct(lo)}, {pct(hi)}]",
                     "yes" if point["backed"] else f"no: needs ≥ {point['clean_needed']} clean photos"])
    return _table(["target FPR", "threshold", "FPR % (95% upper bound)", "TPR % [95% CI]", "backed by the data"],
                  rows, "lrrrl")


def certification_md(results: dict) -> str:
    cert = results.get("certification")
    if not cert:
        return ""
    rows = [[f"{float(r):.2f}", pct(cert["all"][r]), pct(cert["clean"][r]), pct(cert["stamped"][r])]
            for r in cert["all"]]
    return _table(["L2 radius", "all %", "clean %", "stamped %"], rows)


def render_markdown(results: dict) -> str:
    s = results["settings"]
    parts = [
        f"# Evaluation of {s['model']}",
        f"{s['judge']}; {s['images']} {s['size_text']} from {s['photos']} photos of {s['data']}; seed {s['seed']}; "
        f"commit "
        f"{s.get('git_commit') or 'unknown'}; {'quick settings' if s['quick'] else 'full settings'}.",
        f"**Scanner only**: {s['note']}." if s.get("note") else "",
        "## Table 1: detection accuracy", table1_md(results),
        "Clean: photos read as clean; stamped: stamped photos read as stamped; overall: their mean. Each "
        "condition is applied to the clean and the stamped photo before scanning; JPEG is real (Pillow).",
        "## Table 2: imperceptibility", table2_md(results),
    ]
    if results.get("table3"):
        t3 = results["table3"]
        st = t3["settings"]
        judged = (f"the smoothed scanner's PREDICT (σ {t3['sigma']}, n {st['smooth_n']}); abstentions count as "
                  f"wrong" if t3["sigma"] else "the scanner's argmax")
        parts += ["## Table 3: adversarial robustness (L∞)", table3_md(results),
                  f"{t3['n_clean']} clean and {t3['n_stamped']} stamped photos, judged by {judged}. APGD-CE: white "
                  f"box, {st['apgd_iters']} iterations, {st['n_restarts']} restart(s); Square: black box, "
                  f"{st['square_queries']} queries; "
                  + ("apgd-eot: APGD-CE on the noisy scanner with the gradient averaged over "
                     f"{st['eot_iter']} noise draws; adaptive: apgd-eot then Square. " if t3["sigma"] else
                     "adaptive: APGD-CE then Square. ")
                  + "An image counts as robust only if it survives; forgery = clean photos made to scan as "
                    "stamped, removal = stamped photos made to scan as clean."]
    if results.get("calibration"):  # None for a scanner-only model: it needs stamped photos
        parts += ["## Calibrated detection (no corruption)",
                  f"ROC-AUC {num(results['calibration']['auc'], 4)}. Verdict 'stamped' when the score is above the "
                  f"threshold; score = {results['calibration']['score']}.", calibration_md(results)]
    if results.get("certification"):
        c = results["certification"]
        parts += ["## Certified accuracy (randomized smoothing)", certification_md(results),
                  f"σ {c['sigma']}, n0 {c['n0']}, n {c['n']}, alpha {c['alpha']}, {c['images']} photos clean "
                  f"and stamped; abstentions count as wrong."]
    parts.append(PAPER_NOTE)
    return "\n\n".join(p for p in parts if p) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_csvs(results: dict, out: Path) -> list[Path]:
    """table1.csv, table2.csv, table3.csv, calibration.csv, certification.csv (those that apply)."""
    written = []
    tables = {"table1": table1_rows(results), "table2": table2_rows(results), "table3": table3_rows(results),
              "calibration": [{k: v for k, v in p.items() if k != "tpr_ci"} | {"tpr_ci_low": p["tpr_ci"][0],
                                                                                 "tpr_ci_high": p["tpr_ci"][1]}
                              for p in (results["calibration"] or {}).get("operating_points", [])]}
    if results.get("certification"):
        cert = results["certification"]
        tables["certification"] = [{"radius": float(r), "all": cert["all"][r], "clean": cert["clean"][r],
                                    "stamped": cert["stamped"][r]} for r in cert["all"]]
    for name, rows in tables.items():
        if rows:
            write_csv(out / f"{name}.csv", rows)
            written.append(out / f"{name}.csv")
    return written
