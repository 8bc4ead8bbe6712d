"""`evaluate.py --compare RUN_OR_MODEL ...`: several models' results.json assembled into the paper's three tables,
ours (both protocols) beside the paper's numbers, in one markdown file with a JSON beside it."""
from __future__ import annotations

import json
from pathlib import Path

from . import paper as paper_tables
from .tables import _table, num, original_table3_rows, pct, table3_rows


def find_results(path) -> Path:
    """A results.json, an eval folder holding one, a run folder (its eval/, or eval/quick/), or a model folder
    evaluated to evaluate.py's default results/<name>/eval/ → the results.json. One-line error when none."""
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [
        path / "results.json", path / "eval" / "results.json", path / "eval" / "quick" / "results.json",
        Path("results") / path.name / "eval" / "results.json",
        Path("results") / path.name / "eval" / "quick" / "results.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no results.json found (looked at {', '.join(str(c) for c in candidates)}); "
                            f"run evaluate.py --checkpoint {path} first")


def _load(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as evaluate.py's results.json ({e})") from None
    if not isinstance(results, dict) or "settings" not in results:
        raise ValueError(f"{path}: not evaluate.py's results.json (no settings)")
    return results


def _overall(row: dict | None) -> float | None:
    return None if not row or row.get("acc") is None else row["acc"]


def _stats(table: dict | None, metric: str) -> str:
    stats = (table or {}).get(metric)
    if not stats or not stats.get("n"):
        return "–"
    d = 2 if metric == "psnr" else 4
    return f"{num(stats['mean'], d)} ± {num(stats['std'], d)} (n {stats['n']})"


def _settings(results: dict) -> str:
    s = results["settings"]
    return (f"{s['judge']}; {s['images']} {s['size_text']} from {s['photos']} photos of {s['data']}; "
            f"{'quick' if s.get('quick') else 'full'} settings; seed {s.get('seed')}")


def compare(paths: list, out: Path) -> Path:
    """Write OUT (markdown) and OUT with .json: Table 1 (Plain / Plain+DA / Plain+DA+RS), Table 2 (Plain,
    Plain+DA+RS) and Table 3 (the models × APGD-CE, Square, adaptive × ε 2..32/255), each with our strict and
    original-protocol numbers and the paper's."""
    entries = []
    for path in paths:
        source = find_results(path)
        results = _load(source)
        p = results.get("paper") or {}
        entries.append({"path": str(path), "results": str(source), "kind": p.get("kind"),
                        "row3": p.get("table3_row"), "data": results})
    t1, t2, t3 = [], [], []
    for e in entries:
        r, kind = e["data"], e["kind"]
        name = paper_tables.KIND_NAMES.get(kind, "?")
        original = r.get("original") or {}
        if kind in paper_tables.TABLE1 or kind is None:
            t1.append({"model": e["path"], "paper_row": name,
                       "strict": _overall((r.get("table1") or {}).get("none")),
                       "original": _overall((original.get("table1") or {}).get("none")),
                       "paper_pct": paper_tables.TABLE1.get(kind), "photos": (r.get("table1") or {}).get(
                           "none", {}).get("n")})
        if kind in paper_tables.TABLE2:
            paper2 = paper_tables.TABLE2[kind]
            for metric in ("psnr", "ssim", "lpips"):
                t2.append({"model": e["path"], "paper_row": name, "metric": metric,
                           "strict": _stats(r.get("table2"), metric), "original": _stats(original.get("table2"), metric),
                           "paper": f"{paper2[metric][0]:g} ± {paper2[metric][1]:g}"})
        if e["row3"]:
            strict = {(x["attack"], x["eps_255"]): x.get("acc") for x in table3_rows(r)}
            orig = {(x["attack"], x["eps_255"]): x.get("acc") for x in original_table3_rows(r)}
            for attack in ("apgd-ce", "square", "adaptive"):
                for i, eps in enumerate(paper_tables.EPS_255):
                    t3.append({"model": e["path"], "paper_row": e["row3"], "attack": attack, "eps_255": eps,
                               "strict": strict.get((attack, eps)), "original": orig.get((attack, eps)),
                               "paper_pct": paper_tables.TABLE3[e["row3"]][attack][i]})
    differences = {e["path"]: (e["data"].get("paper") or {}).get("differences") for e in entries}
    md = ["# The paper's three tables: ours beside the paper's",
          "Ours in two protocols: *strict* (Cohen's PREDICT with abstention, EOT attacks, by photo) and *original* "
          "(the original code's: mean accuracy of single noisy passes, attacks on the base scanner without noise), "
          "which is how the paper's numbers were made. Accuracies in %. These are the paper's diagnostics (the "
          "argmax, or PREDICT at ½ with evaluate.py's n, on tensors at the working size), not what scan.py decides "
          "at its calibrated rule: each model card's product section has that.",
          "## Table 1: detection accuracy (no corruption)",
          _table(["model", "paper row", "ours, strict", "ours, original", "paper", "photos"],
                 [[x["model"], x["paper_row"], pct(x["strict"]), pct(x["original"]),
                   "–" if x["paper_pct"] is None else f"{x['paper_pct']:g}", str(x["photos"])] for x in t1]),
          "## Table 2: imperceptibility",
          _table(["model", "paper row", "metric", "ours, strict (n photos)", "ours, original (n batches)", "paper"],
                 [[x["model"], x["paper_row"], x["metric"], x["strict"], x["original"], x["paper"]] for x in t2]),
          "## Table 3: accuracy under L∞ attacks",
          _table(["model", "paper row", "attack", "ε", "ours, strict", "ours, original", "paper"],
                 [[x["model"], x["paper_row"], x["attack"], f"{x['eps_255']:g}/255", pct(x["strict"]),
                   pct(x["original"]), f"{x['paper_pct']:g}"] for x in t3], "lllrrrr"),
          "## How each evaluation differs from the paper's setting",
          "\n".join(f"- {path}: " + ("; ".join(d) if d else "the paper's setting") for path, d in differences.items()),
          "## Settings of each evaluation",
          "\n".join(f"- {e['path']}: {_settings(e['data'])} ({e['results']})" for e in entries)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"table1": t1, "table2": t2, "table3": t3,
                                                    "sources": {e["path"]: e["results"] for e in entries},
                                                    "differences": differences}, indent=2) + "\n")
    return out
