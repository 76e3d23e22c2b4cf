"""Is one merge really better than another on a zoo's held-out texts? A paired bootstrap over the texts.

    python benchmarks/paired.py --zoo smollm2_full --a EXPORT_A --b EXPORT_B [--heldout 48] [--rounds 4000]

Both models (and the base and experts the gain is measured against) are scored on the same held-out texts
with quality.py's protocol: each text's first 25% is context, only the tokens after it count. Then the texts
of every domain are resampled with replacement (the same draw for every model, so the comparison is paired),
and each round recomputes the gain retained per domain, `(loss_base - loss) / (loss_base - loss_expert)`
from token-weighted losses, exactly as quality.py does, for A, B and their difference. The table gives the
measured difference and its 95% percentile interval, per domain and for the mean over domains: an interval
that holds 0 says the table's order of the two rows is within the noise of these texts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.table import Table  # noqa: E402

from expertmerge.console import make_console  # noqa: E402
from expertmerge_zoos.evaluation import token_nll_sum  # noqa: E402


@torch.no_grad()
def text_losses(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text its summed suffix NLL (nats) and its number of scored tokens (float64 [rows] each)."""
    sums, counts = [], []
    for row in range(ids.shape[0]):
        used = int(mask[row].sum())
        logits = model(input_ids=ids[row : row + 1, :used], attention_mask=mask[row : row + 1, :used]).logits
        total, count = token_nll_sum(
            logits, ids[row : row + 1, :used], mask[row : row + 1, :used], starts[row : row + 1]
        )
        sums.append(total)
        counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def bootstrap_gains(
    per_model: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]],
    tasks: list[str],
    rounds: int,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per model and task the gain retained in every bootstrap round ([rounds]; round 0 is the texts as
    measured), with the same resampled texts for every model within a round."""
    generator = torch.Generator().manual_seed(seed)
    result: dict[str, dict[str, torch.Tensor]] = {name: {} for name in per_model if name in ("a", "b")}
    for task in tasks:
        rows = per_model["base"][task][0].shape[0]
        draws = torch.randint(0, rows, (rounds, rows), generator=generator)
        draws[0] = torch.arange(rows)  # round 0: the measured texts
        loss = {}
        for name in ("base", f"expert {task}", *result):
            sums, counts = per_model[name][task]
            loss[name] = sums[draws].sum(1) / counts[draws].sum(1)
        for name in result:
            result[name][task] = (loss["base"] - loss[name]) / (loss["base"] - loss[f"expert {task}"])
    return result


def interval(values: torch.Tensor) -> tuple[float, float, float]:
    """(measured value, 2.5 % and 97.5 % percentiles) of a bootstrap [rounds] (round 0 measured)."""
    return float(values[0]), float(values.quantile(0.025)), float(values.quantile(0.975))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", default="smollm2_full")
    parser.add_argument("--a", type=Path, required=True, help="exported model A")
    parser.add_argument("--b", type=Path, required=True, help="exported model B")
    parser.add_argument("--label-a", default="A")
    parser.add_argument("--label-b", default="B")
    parser.add_argument("--heldout", type=int, default=48, help="held-out texts per domain")
    parser.add_argument("--prefix", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=4000)
    parser.add_argument(
        "--heldout-file", action="append", default=[], metavar="DOMAIN=PATH",
        help="score DOMAIN on this jsonl's texts instead of the zoo's held-out split (as quality.py)",
    )  # fmt: skip
    options = parser.parse_args(argv)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # one table at the end, no loading bars per model
    transformers.utils.logging.set_verbosity_error()
    import expertmerge.moe.sequence  # noqa: F401  (A or B may be an exported sequence MoE)
    from benchmarks.quality import load_heldout

    for given in (options.a, options.b):
        if not (given / "config.json").is_file():
            parser.error(f"{given} is not an exported model folder (no config.json)")
    held = load_heldout(options.zoo, options.heldout, options.prefix, options.heldout_file)
    folder, tasks = held.folder, held.tasks
    encoded = {t: (*held.encoded[t], held.starts[t]) for t in tasks}
    paths = {"base": folder / "base", **{f"expert {t}": folder / "experts" / t for t in tasks}}
    paths.update({"a": options.a, "b": options.b})
    per_model: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    console = make_console()
    with console.status("scoring") as status:
        for name, path in paths.items():
            status.update(f"scoring {name} ({path})")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            per_model[name] = {t: text_losses(model, *encoded[t]) for t in tasks}
            del model
    gains = bootstrap_gains(per_model, tasks, options.rounds)
    table = Table(
        title=f"{options.label_a} minus {options.label_b}: gain retained on '{options.zoo}' held-out texts "
        f"(paired bootstrap, {options.rounds} rounds, 95% interval)"
    )
    for column in ("domain", options.label_a, options.label_b, "difference", "95% interval"):
        table.add_column(column, justify="right")
    rows = {t: (gains["a"][t], gains["b"][t]) for t in tasks}
    rows["mean"] = (
        torch.stack([gains["a"][t] for t in tasks]).mean(0),
        torch.stack([gains["b"][t] for t in tasks]).mean(0),
    )
    for name, (a, b) in rows.items():
        diff, low, high = interval(a - b)
        table.add_row(
            name, f"{float(a[0]):.3f}", f"{float(b[0]):.3f}", f"{diff:+.3f}", f"[{low:+.3f}, {high:+.3f}]"
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
