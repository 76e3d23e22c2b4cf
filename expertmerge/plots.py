"""PNG pictures of a fit: coefficients per tensor and expert, importance and chunks per tensor; and of a
sweep of one task's weight: the trade-off between the domains (`tradeoff.png`).

A user looks at these rather than reads coefficients.json. matplotlib runs headless (Agg); a machine
without matplotlib still gets every other output, with a note instead of the pictures.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def short_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'L3 q_proj'."""
    match = re.search(r"\.(\d+)\.", name)
    stem = name.removesuffix(".weight").split(".")[-1]
    return f"L{match.group(1)} {stem}" if match else stem


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots written (pip install matplotlib)", stacklevel=2)
        return None
    return plt


def _tick_every(count: int, most: int = 48) -> int:
    return max(1, -(-count // most))


def plot_coefficients(
    values: torch.Tensor, tensor_names: Sequence[str], expert_names: Sequence[str], path: Path, title: str
) -> Path | None:
    """Heatmap of c[k, p]: one row per expert, one column per tensor (in model order)."""
    plt = _pyplot()
    if plt is None:
        return None
    count = len(tensor_names)
    figure, axes = plt.subplots(figsize=(min(24, 3 + 0.22 * count), 1.2 + 0.5 * len(expert_names)))
    image = axes.imshow(values.float().cpu().numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    step = _tick_every(count)
    axes.set_xticks(range(0, count, step))
    axes.set_xticklabels(
        [short_name(tensor_names[i]) for i in range(0, count, step)], rotation=90, fontsize=7
    )
    axes.set_yticks(range(len(expert_names)))
    axes.set_yticklabels(expert_names)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="coefficient")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_bars(
    heights: Sequence[float], tensor_names: Sequence[str], path: Path, title: str, ylabel: str
) -> Path | None:
    """One bar per tensor (in model order)."""
    plt = _pyplot()
    if plt is None:
        return None
    count = len(tensor_names)
    figure, axes = plt.subplots(figsize=(min(24, 3 + 0.22 * count), 3.5))
    axes.bar(range(count), list(heights), color="#3b75af")
    step = _tick_every(count)
    axes.set_xticks(range(0, count, step))
    axes.set_xticklabels(
        [short_name(tensor_names[i]) for i in range(0, count, step)], rotation=90, fontsize=7
    )
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def coefficients_title(chunk_counts: Sequence[int]) -> str:
    """The heatmap's title by what was fit: one coefficient per tensor (layer-wise, some maybe fixed), or
    chunks (Expert Merging++), shown as their mean weighted by chunk size."""
    if any(count > 1 for count in chunk_counts):
        return "learned coefficients, chunk-wise fit (chunk-size weighted mean per tensor)"
    fixed = sum(count == 0 for count in chunk_counts)
    return "learned coefficients, layer-wise fit (one per tensor" + (f"; {fixed} fixed)" if fixed else ")")


def write_plots(module: Any, folder: Path) -> list[Path]:
    """coefficients.png (and, after Expert Merging++, importance.png and chunks.png) into `folder`."""
    names, experts = module.coefficient_names, module.expert_names
    written = [
        plot_coefficients(
            module.coefficients.layerwise_values(),
            names,
            experts,
            folder / "coefficients.png",
            coefficients_title(module.coefficients.chunk_counts),
        )
    ]
    allocation = module.chunk_allocation
    if allocation is not None:
        tensors = allocation["tensors"]
        written.append(
            plot_bars(
                [tensors[n]["importance"] for n in names],
                names,
                folder / "importance.png",
                "Expert Merging++ importance per tensor (from the layer-wise fit)",
                "importance (sums to 1)",
            )
        )
        written.append(
            plot_bars(
                [tensors[n]["chunks"] for n in names],
                names,
                folder / "chunks.png",
                f"chunks allocated (budget {allocation['budget']}, kappa {allocation['kappa']}; 0 = fixed)",
                "chunks",
            )
        )
    return [path for path in written if path is not None]


def plot_tradeoff(
    weights: Sequence[float],
    gains: dict[str, Sequence[float]],
    base_kl: dict[str, Sequence[float]],
    swept: str,
    path: Path,
) -> Path | None:
    """Each expert task's gain retained (left axis, solid) and each base task's KL to the base (right axis,
    dashed) against the swept task's weight (log axis when every weight is positive)."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for name, values in gains.items():
        axes.plot(weights, values, marker="o", label=f"{name} gain" + (" (swept)" if name == swept else ""))
    axes.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
    axes.set_xlabel(f"weight of task '{swept}' (model.task_weights)")
    axes.set_ylabel("gain retained (1 = expert, 0 = base)")
    if all(w > 0 for w in weights):
        axes.set_xscale("log")
        axes.minorticks_off()  # the weights themselves are the ticks
        axes.set_xticks(list(weights))
        axes.set_xticklabels([f"{w:g}" for w in weights])
    lines, labels = axes.get_legend_handles_labels()
    if base_kl:
        right = axes.twinx()
        for name, values in base_kl.items():
            right.plot(
                weights,
                values,
                marker="s",
                linestyle="--",
                color="black" if len(base_kl) == 1 else None,
                label=f"{name}: KL to base",
            )
        right.set_ylabel("general text: KL(base || merge)")
        more_lines, more_labels = right.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    axes.legend(lines, labels, fontsize=8, loc="best")
    axes.set_title(f"Trade-off: sweep of the weight of '{swept}'")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
