"""Every common causal-LM family: `merge` (TIES) and `fit` (2 steps) each give a model that loads with no missing or
unexpected keys and generates, or a one-line refusal; never a traceback. Each family's outcome is the one
docs/ARCHITECTURES.md tells users (rewritten by benchmarks/architectures.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import families  # noqa: E402

_spec = importlib.util.spec_from_file_location("architectures", ROOT / "benchmarks" / "architectures.py")
architectures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(architectures)
DOCUMENTED = architectures.documented()


def test_the_page_lists_every_family() -> None:
    assert sorted(DOCUMENTED) == sorted(families.FAMILIES)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_family_merges_and_fits_or_is_refused_in_one_line(tmp_path: Path, family: str) -> None:
    result = families.outcome(family, tmp_path / family)
    assert "build" not in result, result
    for command in ("merge", "fit"):
        outcome = architectures.cell(result[command], tmp_path / family)
        assert outcome == "ok" or outcome.startswith("refused: "), (command, outcome)
        assert "\n" not in outcome
        assert outcome == DOCUMENTED[family][command], (command, outcome)
