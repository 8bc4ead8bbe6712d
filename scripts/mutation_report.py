"""Counts of `make mutation`'s last run, per module: killed, survived, timed out, not reached by the selected tests.

Reads mutmut's result files (mutants/**/*.meta) and keeps the mutants whose names match the patterns given
(the same ones `make mutation` passes to `mutmut run`); prints a table and the names of the survivors, which
`mutmut show NAME` shows as a diff.

    python scripts/mutation_report.py "smoothing.core.*" "report.calibration.*"
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import sys
from pathlib import Path

#: mutmut's exit codes (mutmut/stats.py), folded into the four outcomes we report.
OUTCOME = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
           5: "no tests", 33: "no tests", None: "not run"}
COLUMNS = ["killed", "survived", "timeout", "no tests", "not run", "other"]


def outcomes(mutants_dir: Path, patterns: list[str]) -> dict[str, dict[str, str]]:
    """{module: {mutant name: outcome}} for the mutants matching `patterns`."""
    found: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                found[name.split(".x")[0]][name] = OUTCOME.get(code, "other")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patterns", nargs="+", help="mutant name patterns, as given to `mutmut run`")
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's folder (default: mutants)")
    args = parser.parse_args(argv)
    if not args.mutants.is_dir():
        print(f"error: {args.mutants}: no mutmut results here; run `make mutation` first", file=sys.stderr)
        return 2
    found = outcomes(args.mutants, args.patterns)
    if not found:
        print(f"error: no mutant in {args.mutants} matches {' '.join(args.patterns)}", file=sys.stderr)
        return 2
    width = max(len(m) for m in found)
    print(f"{'module':<{width}}  " + "  ".join(f"{c:>8}" for c in COLUMNS) + "     score")
    totals = collections.Counter()
    for module, results in sorted(found.items()):
        counts = collections.Counter(results.values())
        totals.update(counts)
        print(f"{module:<{width}}  " + "  ".join(f"{counts[c]:>8}" for c in COLUMNS) + f"  {_score(counts):>8}")
    print(f"{'all':<{width}}  " + "  ".join(f"{totals[c]:>8}" for c in COLUMNS) + f"  {_score(totals):>8}")
    survivors = sorted(n for results in found.values() for n, o in results.items() if o in ("survived", "no tests"))
    if survivors:
        print(f"\nnot killed ({len(survivors)}; `mutmut show NAME` shows each):")
        print("\n".join(f"  {n}  ({found[n.split('.x')[0]][n]})" for n in survivors))
    return 0


def _score(counts: collections.Counter) -> str:
    """Killed (timeouts count as killed: the mutant broke the tests' run) over all that ran."""
    ran = counts["killed"] + counts["timeout"] + counts["survived"] + counts["no tests"]
    return f"{100 * (counts['killed'] + counts['timeout']) / ran:.1f}%" if ran else "-"


if __name__ == "__main__":
    sys.exit(main())
