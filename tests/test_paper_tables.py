"""report/paper.py: the paper's numbers equal ../shared/PAPER.md's transcription, and runs map to the paper's rows."""
import re
from pathlib import Path

import pytest

from report import paper

PAPER_MD = Path(__file__).resolve().parents[2] / "shared" / "PAPER.md"


def _rows(section: str) -> list[list[str]]:
    """The table rows (cells, stripped) under the heading that starts with `section`."""
    text = PAPER_MD.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")][1:]


def _num(cell: str) -> float:
    return float(re.sub(r"[%\s]", "", cell))


def test_table1_matches_paper_md():
    rows = {r[0]: _num(r[1]) for r in _rows("Table 1")}
    assert paper.TABLE1 == {"plain": rows["DeepRAFT [Plain]"], "plain_da": rows["DeepRAFT [Plain+DA]"],
                            "da_rs": rows["DeepRAFT [Plain+DA+RS]"]}


def test_table2_matches_paper_md():
    rows = {r[0]: r[1:] for r in _rows("Table 2")}
    for kind, name in (("plain", "DeepRAFT [Plain]"), ("da_rs", "DeepRAFT [Plain+DA+RS]")):
        cells = [tuple(float(v) for v in c.split("±")) for c in rows[name]]
        assert [paper.TABLE2[kind][m] for m in ("psnr", "ssim", "lpips")] == cells


def test_table3_matches_paper_md():
    rows = {r[0]: [_num(c) for c in r[1:]] for r in _rows("Table 3")}
    names = {"plain": "Plain", "rs_0.25": "RS σ=0.25", "rs_0.5": "RS σ=0.5", "rs_0.75": "RS σ=0.75",
             "da_rs_0.25": "DA+RS σ=0.25"}
    assert set(paper.TABLE3) == set(names)
    for key, name in names.items():
        ours = [v for attack in ("apgd-ce", "square", "adaptive") for v in paper.TABLE3[key][attack]]
        assert ours == rows[name], key


@pytest.mark.parametrize("run_args,config,name,kind", [
    ({"script": "train", "aug": False}, {}, "x", "plain"),
    ({"script": "train", "aug": True}, {}, "x", "plain_da"),
    ({"script": "train_rs", "std": 0.5}, {}, "x", "rs"),
    ({"script": "train_rs_aug", "std": 0.25}, {}, "x", "da_rs"),
    ({}, {"sigma": 0.5}, "sigma_0.5", "rs"),
    ({}, {"sigma": 0.25}, "rs_aug", "da_rs"),
    ({}, {}, "baseline", "plain"),
    ({}, {}, "mystery", None),
])
def test_model_kind(run_args, config, name, kind):
    assert paper.model_kind(run_args, config, name) == kind


def test_table3_row_and_setting_differences():
    assert paper.table3_row("rs", 0.5) == "rs_0.5" and paper.table3_row("da_rs", 0.25) == "da_rs_0.25"
    assert paper.table3_row("da_rs", 0.5) is None and paper.table3_row("plain_da", None) is None
    assert paper.setting_differences({"recipe": "original", "train_path": "data/mirflickr400"}, {"step": 200_000},
                                     "data/mirflickr400", "photos fitted to 400×400") == []
    diffs = paper.setting_differences({"recipe": "robust", "train_path": "../shared/data/photos180"},
                                      {"step": 4250}, "../shared/data/bsds400", "tiles of 128×128")
    assert len(diffs) == 5 and any("4,250" in d for d in diffs) and any("robust" in d for d in diffs)
