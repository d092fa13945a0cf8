"""Every notebook runs top to bottom (on the CPU here) and is committed with its outputs."""
import copy
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_dynamic_masks.ipynb", "03_performance.ipynb",
            "04_training.ipynb"]


def test_all_notebooks_present():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "execute and save the notebook"
    for c in code:
        for out in c.get("outputs", []):
            assert out.get("output_type") != "error", f"saved with an error: {c.source[:80]}"
    if path.stem in ("02_dynamic_masks", "04_training"):
        assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(nb)  # never rewrite the committed file
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.time()
    client.execute()  # raises CellExecutionError on any failing cell
    assert time.time() - t0 < 120, "notebooks should stay small: under ~30 s on a CPU"
