"""Drop a folder from a wheel, keeping its RECORD consistent: make wheelhouse uses it on pyautoattack, whose wheel
is 42 MB, nearly all of it an example model (pyautoattack/examples/model_test.pt) that nothing imports, while a
call to the GPU machine carries 64 MiB with the working tree.

    python scripts/slim_wheel.py .whl/pyautoattack-0.2.0-py3-none-any.whl --drop /examples/
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path


def slim(wheel: Path, drop: str) -> int:
    """Rewrite `wheel` without the members whose name contains `drop` (and their RECORD lines) → members dropped."""
    with zipfile.ZipFile(wheel) as source:
        names = [n for n in source.namelist() if drop not in n]
        dropped = len(source.namelist()) - len(names)
        if not dropped:
            return 0
        slimmed = wheel.with_name(wheel.name + ".part")
        with zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as out:
            for name in names:
                data = source.read(name)
                if name.endswith(".dist-info/RECORD"):
                    data = b"".join(line for line in data.splitlines(keepends=True) if drop.encode() not in line)
                out.writestr(source.getinfo(name), data, zipfile.ZIP_DEFLATED)
    slimmed.replace(wheel)
    return dropped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheels", nargs="+", type=Path, help="wheel files, rewritten in place")
    p.add_argument("--drop", required=True, help="drop the members whose path contains this text, e.g. /examples/")
    args = p.parse_args(argv)
    for wheel in args.wheels:
        print(f"{wheel}: {slim(wheel, args.drop)} member(s) dropped, {wheel.stat().st_size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
