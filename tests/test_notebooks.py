"""Run every notebook in nbs/ as a test (nbdev's runner: `#| eval: false` and flagged cells are honoured)."""
from configparser import ConfigParser
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook  # renamed: pytest would collect `test_nb`

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))


def skip_flags() -> list[str]:
    "The flags listed in settings.ini's tst_flags (slow, gpu, notest): cells carrying them are not run here."
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"].get("tst_flags", "").split()


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 5, NOTEBOOKS


@pytest.mark.timeout(900)
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb):
    ok, seconds = run_notebook(nb, skip_flags=skip_flags(), basepath=str(ROOT))
    assert ok, f"{nb.name} failed (its traceback is printed above)"
