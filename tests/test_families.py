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


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3"])
def test_tied_embeddings_stay_tied_and_unwritten(tmp_path: Path, family: str) -> None:
    """Gemma3 and small Qwen3 models tie lm_head to the embeddings: the checkpoint stores one of them, and so
    do the outputs."""
    from safetensors import safe_open

    result = families.outcome(family, tmp_path / family, tie_word_embeddings=True)
    assert result == {"merge": "ok", "fit": "ok"}, result
    for output in ("merged", "fitted"):
        with safe_open(str(tmp_path / family / output / "model.safetensors"), "pt") as handle:
            names = set(handle.keys())
        with safe_open(str(tmp_path / family / "base" / "model.safetensors"), "pt") as handle:
            assert names == set(handle.keys()), output
        assert "lm_head.weight" not in names, output
