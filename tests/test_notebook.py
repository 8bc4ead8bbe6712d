"""Image_Processing.ipynb runs top to bottom (nbclient, the engine nbmake uses) on a mock MetFaces folder.

    DEEPRAFT_SRC=... DEEPRAFT_DST=... pytest --nbmake Image_Processing.ipynb   # the same by hand
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbclient
import nbformat
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "Image_Processing.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert nb.metadata.kernelspec.name == "python3"


def test_notebook_prepares_a_metfaces_layout(tmp_path, monkeypatch):
    # MetFaces as downloaded: metfaces-dataset/{metfaces.json, images/NNNNN-FF.png at 1024×1024}.
    root = tmp_path / "metfaces-dataset"
    images = root / "images"
    images.mkdir(parents=True)
    (root / "metfaces.json").write_text("[]")
    rng = np.random.default_rng(0)
    for name in ("10000-00.png", "10001-00.png", "10001-01.png"):
        low = rng.uniform(0, 255, (9, 9, 3)).astype(np.uint8)
        Image.fromarray(low).resize((1024, 1024), Image.BICUBIC).save(images / name)
    (images / "10002-00.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dst = tmp_path / "metfaces400"

    monkeypatch.setenv("DEEPRAFT_SRC", str(images))
    monkeypatch.setenv("DEEPRAFT_DST", str(dst))
    monkeypatch.setenv("DEEPRAFT_WORKERS", "2")
    # This venv's kernelspecs first, before any user-wide python3 kernel that may run another interpreter.
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Which interpreter ran it: it must be this one (the venv's python3 kernel), not another on PATH.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError if any cell fails

    written = sorted(p.name for p in dst.iterdir() if not p.name.startswith("."))
    assert written == ["10000-00.png", "10001-00.png", "10001-01.png"]
    for name in written:
        with Image.open(dst / name) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (400, 400))

    def text(cell):
        return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")

    stdout = "\n".join(text(cell) for cell in nb.cells if cell.cell_type == "code")
    assert "4 images under" in stdout and "4 to prepare, 0 already done" in stdout
    assert "3 written now, 0 already done, 1 failed" in stdout
    assert "skipped " in stdout and "10002-00.png" in stdout
    pictures = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                if "image/png" in out.get("data", {})]
    assert len(pictures) == 1  # the before/after thumbnails
    assert f"KERNEL {sys.executable}" in stdout
