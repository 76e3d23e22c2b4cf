"""Which model families `merge` and `fit` take: writes docs/ARCHITECTURES.md and prints the same table.

For every family in tests/families.py: a tiny random base and two fine-tunes saved with `save_pretrained`,
then `merge` (TIES) and `fit` (2 steps) in this process. An outcome is `ok` (the output loads with
`from_pretrained` with no missing, unexpected or mismatched keys, and generates) or the command's one-line
refusal. tests/test_families.py checks that every family still does what the page says.

    python benchmarks/architectures.py            # about two minutes on 2 CPU cores
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import families  # noqa: E402

PAGE = ROOT / "docs" / "ARCHITECTURES.md"
KINDS = {
    **dict.fromkeys(families.DENSE, "dense"),
    **dict.fromkeys(families.MOE, "MoE"),
    **dict.fromkeys(families.OLDER, "older config names"),
    **dict.fromkeys(families.HYBRID, "hybrid / state-space"),
}

INTRO = """# Architectures

Which model families expertmerge's `merge` (training-free, mergekit's methods) and `fit` (Expert Merging, learned)
take, measured on tiny random models of each family built by the installed transformers ({transformers}), saved
with `save_pretrained` as users' checkpoints are. `ok`: the command's output loads with `from_pretrained` with no
missing, unexpected or mismatched keys and generates. Otherwise the cell is the command's one-line refusal.
`tests/test_families.py` checks every row on every test run; `python benchmarks/architectures.py` rewrites this page.

What makes a family work:

- **Checkpoint names differ from the model's.** transformers 5 renames some checkpoint keys when it loads a model
  and builds MoE experts into fused 3-D tensors from one tensor per expert. expertmerge reads every tensor through
  transformers' own conversions (`expertmerge/io/layout.py`) and writes outputs back in the checkpoint's own
  names and layout, so what you merge loads wherever the inputs did.
- **MoE fine-tunes** (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss ...): `fit` learns a coefficient per (tensor, expert
  model); the fused expert weights learn too, and with `model.expert_axis: true` each routed expert gets its own
  coefficient. The result is an MoE of the same architecture. `model.moe` (building an MoE from dense experts) is
  refused on an MoE base.
- **Fused MoE output** (`fit --model.moe`, `export --moe`) exists for llama / mistral (as Mixtral), qwen2
  (Qwen2-MoE), qwen3 (Qwen3-MoE), granite (GraniteMoE, its multipliers kept) and olmo2 (FlexOlmo); the mergekit-moe
  `moe` command writes mergekit's families only (Mixtral, Qwen2-MoE, Qwen3-MoE). phi3 has none: PhiMoE normalises
  with LayerNorm where Phi3 has RMSNorm, so no PhiMoE reproduces a Phi3; nor does OLMoE an OLMo2 (OLMoE is
  pre-norm, OLMo2 post-norm). Other families get a one-line refusal there, and the sequence MoE works for any
  family.

| family | kind | `merge` (TIES) | `fit` (2 steps) |
|---|---|---|---|
"""


def cell(text: str, folder: Path) -> str:
    """An outcome as the page shows it: the run's folder as `<dir>`, pipes escaped."""
    return text.replace(str(folder), "<dir>").replace("|", "\\|")


def documented() -> dict[str, dict[str, str]]:
    """The page's rows: {family: {"merge": ..., "fit": ...}}."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        match = re.match(r"^\| `([^`]+)` \| [^|]+ \| (.*) \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = {"merge": match.group(2), "fit": match.group(3)}
    return rows


def main() -> int:
    import transformers
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    rows, started = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, Progress(transient=True) as progress:
        task = progress.add_task("families", total=len(families.FAMILIES))
        for family in families.FAMILIES:
            folder = Path(tmp) / family
            result = families.outcome(family, folder)
            rows[family] = {k: cell(v, folder) for k, v in result.items()}
            progress.advance(task)
    lines = [INTRO.format(transformers=transformers.__version__)]
    table = Table("family", "kind", "merge", "fit", title="expertmerge on each family")
    for family, result in rows.items():
        merge, fit = result.get("merge", result.get("build", "")), result.get("fit", "")
        lines.append(f"| `{family}` | {KINDS[family]} | {merge} | {fit} |\n")
        table.add_row(family, KINDS[family], merge, fit)
    PAGE.write_text("".join(lines))
    Console().print(table)
    print(f"{len(rows)} families in {time.perf_counter() - started:.0f} s; wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
