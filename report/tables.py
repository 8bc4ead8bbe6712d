"""results.json → tables.md and CSV files, in the paper's layout (Table 1 detection, Table 2
imperceptibility, Table 3 adversarial robustness), plus Table 1b (detection after forwarding), calibration,
forgery and certification.

Everything here reads the results dict that evaluate.py writes as results.json, so the markdown, the CSVs
and the JSON cannot disagree.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

def paper_note(results: dict) -> str:
    """Which of the paper's models the 'paper' columns are, and what differs from the paper's setting."""
    p = results.get("paper") or {}
    if not p.get("kind"):
        return f"Paper columns: {p.get('note') or 'none'}."
    differs = p.get("differences") or []
    where = ("; this evaluation differs from the paper's setting (MIRFlickr-25k at 400×400, 200,000 steps, the "
             "original code's training): " + "; ".join(differs) + ", so the columns are not like for like"
             if differs else "; this is the paper's setting")
    return (f"Paper columns: DeepRAFT [{p['name']}] of the paper (report/paper.py, transcribed from the original "
            f"repository's figures){where}.")


def _paper(results: dict) -> dict:
    return results.get("paper") or {}


def _paper_pct(value) -> str:
    return "–" if value is None else f"{value:g}"


def _paper_table3(results: dict, attack: str, eps_255: float):
    """The paper's Table 3 accuracy (%) for this model's row, `attack` and ε, or None."""
    p = _paper(results)
    row = (p.get("table3") or {}).get(attack)
    eps = p.get("eps_255") or []
    if row is None or eps_255 not in eps:
        return None
    return row[eps.index(eps_255)]


def pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def num(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table1_rows(results: dict, key: str = "table1") -> list[dict]:
    """Rows of Table 1 (key "table1"), with the paper's overall accuracy beside "none", or of Table 1b (key
    "forwarding": none when it was skipped; the paper has no such table), one per condition."""
    return _with_paper(results, results.get(key), key)


def _with_paper(results: dict, table: dict | None, key: str) -> list[dict]:
    if key != "table1":
        return [{"condition": name, **row} for name, row in (table or {}).items()]
    paper = _paper(results).get("table1")
    return [{"condition": name, **row, "paper_acc_pct": paper if name == "none" else None}
            for name, row in (table or {}).items()]


def forwarding_rows(results: dict) -> list[dict]:
    """Rows of Table 1b, forwarding (results["forwarding"]; [] when it was skipped)."""
    return table1_rows(results, "forwarding")


def table1_md(results: dict, key: str = "table1") -> str:
    if any("fpr" in r for r in table1_rows(results, key)):  # a scanner-only model: clean photos only
        rows = [[r["condition"], pct(r["acc_clean"]), pct(r["fpr"]), pct(r["abstain"]), str(r["n"])]
                for r in table1_rows(results, key)]
        return _table(["condition", "clean read as clean %", "false positives %", "abstained %", "photos"], rows)
    paper = key == "table1"
    rows = [[r["condition"], pct(r["acc_clean"]), pct(r["acc_stamped"]), pct(r["acc"]), pct(r["abstain"]),
             num(r["auc"], 4), str(r["n"])] + ([_paper_pct(r["paper_acc_pct"])] if paper else [])
            for r in table1_rows(results, key)]
    return _table(["condition", "clean %", "stamped %", "overall %", "abstained %", "ROC-AUC", "photos"]
                  + (["paper overall %"] if paper else []), rows)


def table2_rows(results: dict, table: dict | None = None) -> list[dict]:
    """Rows of Table 2 (`table`: results["table2"] by default, or the original protocol's) with the paper's."""
    rows = []
    paper = _paper(results).get("table2") or {}
    for metric, stats in (results["table2"] if table is None else table).items():
        if isinstance(stats, dict) and "mean" in stats:
            mean, std = paper.get(metric, (None, None))
            rows.append({"metric": metric, **stats, "paper_mean": mean, "paper_std": std})
    return rows


def table2_md(results: dict, table: dict | None = None, unit: str = "photos") -> str:
    digits = {"psnr": 2, "ssim": 4, "lpips": 4}
    rows = []
    for r in table2_rows(results, table):
        d = digits.get(r["metric"], 4)
        value = "n/a" if r["n"] == 0 else f"{num(r['mean'], d)} ± {num(r['std'], d)}"
        paper = "–" if r["paper_mean"] is None else f"{r['paper_mean']:g} ± {r['paper_std']:g}"
        rows.append([{"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}.get(r["metric"], r["metric"]),
                     value, str(r["n"]), paper])
    text = _table(["metric", "mean ± std", unit, "paper"], rows)
    note = results["table2"].get("lpips_note")
    if note:
        text += f"\n\nLPIPS: {note}"
    return text


def table3_rows(results: dict, table3: dict | None = None) -> list[dict]:
    """One row per attack and ε of Table 3 (`table3`: results["table3"] by default, or the original protocol's),
    with the paper's accuracy for this model's row where it has one."""
    rows = []
    table3 = (results.get("table3") if table3 is None else table3) or {}
    for attack, by_eps in table3.get("attacks", {}).items():
        for row in by_eps.values():
            eps_255 = round(row["eps"] * 255, 6)
            rows.append({"attack": attack, "eps_255": eps_255, **row,
                         "paper_acc_pct": _paper_table3(results, attack, eps_255)})
    return rows


def table3_md(results: dict) -> str:
    t3 = results["table3"]
    none = t3["no_attack"]
    rows = [["no attack", "0", pct(none["acc_clean"]), pct(none["acc_stamped"]), pct(none["acc"]), "–", "–", "–"]]
    for r in table3_rows(results):
        rows.append([r["attack"], f"{r['eps_255']:g}/255", pct(r.get("acc_clean")), pct(r.get("acc_stamped")),
                     pct(r.get("acc")), pct(r.get("forgery_success")), pct(r.get("removal_success")),
                     _paper_pct(r["paper_acc_pct"])])
    return _table(["attack", "ε (L∞)", "clean %", "stamped %", "overall %", "forgery success %",
                   "removal success %", "paper overall %"], rows, "llrrrrrr")


def original_table3_rows(results: dict) -> list[dict]:
    """The original protocol's Table 3 (report.original_protocol.original_attack_table), one row per attack and ε."""
    return table3_rows(results, (results.get("original") or {}).get("table3") or {})


def original_table3_md(results: dict) -> str:
    rows = [[r["attack"], f"{r['eps_255']:g}/255", pct(r["acc_clean"]), pct(r["acc_stamped"]), pct(r["acc"]),
             _paper_pct(r["paper_acc_pct"])] for r in original_table3_rows(results)]
    return _table(["attack", "ε (L∞)", "clean %", "stamped %", "overall %", "paper overall %"], rows, "llrrrr")


def original_table1_rows(results: dict, key: str = "table1") -> list[dict]:
    """The original protocol's Table 1 (key "table1") or Table 1b (key "forwarding"), one row per condition."""
    return _with_paper(results, (results.get("original") or {}).get(key), key)


def original_table1_md(results: dict, key: str = "table1") -> str:
    paper = key == "table1"
    rows = [[r["condition"], pct(r["acc_clean"]), pct(r["acc_stamped"]), pct(r["acc"]), str(r["n"])]
            + ([_paper_pct(r["paper_acc_pct"])] if paper else []) for r in original_table1_rows(results, key)]
    return _table(["condition", "clean %", "stamped %", "overall %", "photos"] + (["paper overall %"] if paper else []),
                  rows)


def calibration_md(results: dict) -> str:
    rows = []
    for point in results["calibration"]["operating_points"]:
        lo, hi = point["tpr_ci"]
        gap = point.get("gap")  # results written before thresholds sat in the middle of the gap have none
        rows.append([f"{100 * point['target_fpr']:g}%", num(point["threshold"], 4)
                     + (f" ({num(gap[0], 4)} to {num(gap[1], 4)})" if gap else ""),
                     f"{pct(point['fpr'])} (≤ {pct(point['fpr_upper_bound'])})",
                     f"{pct(point['tpr'])} [{pct(lo)}, {pct(hi)}]",
                     "yes" if point["backed"] else f"no: needs ≥ {point['clean_needed']} clean photos"])
    return _table(["target FPR", "threshold (middle of the gap)", "FPR % (95% upper bound)", "TPR % [95% CI]",
                   "backed by the data"], rows, "lrrrl")


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
        *forwarding_md(results),
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
    if results.get("original"):
        parts += original_md(results)
    parts.append(paper_note(results))
    return "\n\n".join(p for p in parts if p) + "\n"


def forwarding_md(results: dict) -> list[str]:
    """Table 1b's section of tables.md ([] when it was skipped)."""
    if not results.get("forwarding"):
        return []
    how = results["settings"].get("forwarding") or {}
    steps = "; ".join(f"{name}: {text}" for name, text in (how.get("conditions") or {}).items())
    return ["## Table 1b: forwarding (what a messaging app does to a photo)", table1_md(results, "forwarding"),
            "Each photo, clean and stamped alike, is saved as 8-bit pixels, sent through real codecs (Pillow), and "
            f"judged as in Table 1, per photo; {how.get('judged', '')}. {steps}."]


def original_md(results: dict) -> list[str]:
    """The original protocol's section of tables.md: how the original code scored, so that the paper's numbers
    can stand beside ours."""
    o = results["original"]
    parts = ["## The original protocol",
             "How the original code scored its models, and so how the paper's numbers were made (docs/"
             "evaluation.md): no vote and no abstention, attacks on the base scanner without noise.",
             "### Table 1 (original protocol)", original_table1_md(results), f"Judged by {o['table1_judge']}."]
    if o.get("forwarding"):
        parts += ["### Table 1b: forwarding (original protocol)", original_table1_md(results, "forwarding"),
                  f"The forwarded photos of Table 1b, judged by {o['table1_judge']}."]
    if o.get("table2"):
        parts += ["### Table 2 (original protocol)", table2_md(results, o["table2"], unit="batches"),
                  o["table2"].get("note", "")]
    if o.get("table3"):
        parts += ["### Table 3 (original protocol)", original_table3_md(results), o["table3"].get("note", "")]
    return parts


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_csvs(results: dict, out: Path) -> list[Path]:
    """table1.csv, forwarding.csv, table2.csv, table3.csv, calibration.csv, certification.csv and the original
    protocol's (those that apply)."""
    written = []
    tables = {"table1": table1_rows(results), "forwarding": forwarding_rows(results), "table2": table2_rows(results),
              "table3": table3_rows(results), "original_table1": original_table1_rows(results),
              "original_forwarding": original_table1_rows(results, "forwarding"),
              "original_table2": table2_rows(results, (results.get("original") or {}).get("table2") or {}),
              "original_table3": original_table3_rows(results),
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
