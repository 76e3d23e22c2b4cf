"""Peak memory of a streamed TIES merge versus the size of one model, and versus the simple way.

    python benchmarks/merge_memory.py                 # tiny zoo + a ~240 MB synthetic Llama, 3 experts
    python benchmarks/merge_memory.py --skip-synthetic
    python benchmarks/merge_memory.py --hidden 768 --layers 12 --experts 4

Each measurement runs in its own process, so one run's allocations cannot hide in another's peak. The peak
resident memory is reset (Linux `/proc/self/clear_refs`) after the libraries are imported; "over start" is
what the merge itself added. The simple way loads the base and every expert with `from_pretrained`, merges
the state dicts with the same `merge_tensor` and saves with `save_pretrained`: its memory grows with the
number of experts, the streamed merge's does not. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_TAG = "RESULT_JSON "


# ------------------------------------------------------------------------------------------- child side


def _child(options: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from expertmerge import methods
    from expertmerge.merge import current_rss_bytes, peak_rss_bytes, reset_peak_rss, run_merge

    def ties_config(base: str, experts: list[str]) -> dict:
        return {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
            "parameters": {"normalize": True},
        }

    def streaming(base: str, experts: list[str], out: str) -> None:
        run_merge(ties_config(base, experts), out=out, force=True, progress=False)

    def naive(base_dir: str, experts: list[str], out: str) -> None:
        method, params = methods.get_method("ties"), methods.MethodParams(normalize=True)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        states = [AutoModelForCausalLM.from_pretrained(e, dtype=torch.float32).state_dict() for e in experts]
        merged = {
            name: methods.merge_tensor(
                method,
                tensor,
                [state[name] for state in states],
                [methods.ExpertParams(1.0, 0.5)] * len(states),
                params,
                methods.tensor_generator(0, name),
            )
            for name, tensor in base.state_dict().items()
        }
        base.load_state_dict(merged)
        base.save_pretrained(out)

    run = streaming if options.child == "streaming" else naive
    spec = json.loads(options.child_spec)
    # A warm-up on the tiny zoo loads the lazily imported code first, so "over start" counts tensors only.
    run(spec["warmup_base"], spec["warmup_experts"], spec["out"] + "-warmup")
    reset_peak_rss()
    start = current_rss_bytes()
    started = time.perf_counter()
    run(spec["base"], spec["experts"], spec["out"])
    result = {"wall_s": time.perf_counter() - started, "peak_rss": peak_rss_bytes(), "start_rss": start}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent side


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _synthetic_models(
    root: Path, experts: int, hidden: int, layers: int, vocab: int
) -> tuple[str, list[str]]:
    """A random base Llama and experts = base + small noise, saved as safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    state = {k: v.detach() for k, v in base.state_dict().items()}
    expert_dirs = []
    for k in range(experts):
        folder = root / f"expert{k}"
        folder.mkdir()
        generator = torch.Generator().manual_seed(k + 1)
        save_file(
            {
                n: (t + 0.01 * torch.randn(t.shape, generator=generator)).contiguous()
                for n, t in state.items()
            },
            folder / "model.safetensors",
            metadata={"format": "pt"},
        )
        shutil.copy(root / "base" / "config.json", folder / "config.json")
        expert_dirs.append(str(folder))
    return str(root / "base"), expert_dirs


def _largest_tensor_bytes(folder: Path) -> int:
    from safetensors import safe_open

    largest = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                view = handle.get_slice(name)
                numel = 1
                for size in view.get_shape():
                    numel *= size
                largest = max(largest, numel * {"F32": 4, "BF16": 2, "F16": 2}.get(view.get_dtype(), 4))
    return largest


def _measure(way: str, base: str, experts: list[str], out: Path, warmup: tuple[str, list[str]]) -> dict:
    spec = json.dumps(
        {
            "base": base,
            "experts": experts,
            "out": str(out),
            "warmup_base": warmup[0],
            "warmup_experts": warmup[1],
        }
    )
    completed = subprocess.run(
        [sys.executable, __file__, "--child", way, "--child-spec", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise SystemExit(f"{way} run failed:\n{completed.stdout}\n{completed.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, default=3, help="experts in the synthetic case")
    parser.add_argument("--hidden", type=int, default=768, help="synthetic model hidden size")
    parser.add_argument("--layers", type=int, default=8, help="synthetic model layers")
    parser.add_argument("--vocab", type=int, default=8192, help="synthetic model vocabulary")
    parser.add_argument("--skip-synthetic", action="store_true", help="only the tiny zoo")
    parser.add_argument("--skip-naive", action="store_true", help="only the streamed merge")
    parser.add_argument("--child", choices=["streaming", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--child-spec", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        _child(options)
        return

    from rich.table import Table

    from expertmerge.cli.merge import human_bytes
    from expertmerge.console import make_console
    from expertmerge.zoo_registry import resolve_path

    console = make_console()
    cases = []
    zoo_base = resolve_path("zoo://tiny/base")  # builds the zoo once if needed
    zoo_experts = [resolve_path(f"zoo://tiny/experts/{t}") for t in ("arith", "reverse", "sort")]
    cases.append(("tiny zoo", zoo_base, zoo_experts))
    with tempfile.TemporaryDirectory(prefix="merge-memory-") as work:
        work = Path(work)
        if not options.skip_synthetic:
            with console.status("building synthetic models"):
                base, experts = _synthetic_models(
                    work / "synthetic", options.experts, options.hidden, options.layers, options.vocab
                )
            cases.append((f"synthetic Llama h{options.hidden} x{options.layers}", base, experts))

        table = Table(title="TIES merge: wall time and peak memory (each run in a fresh process)")
        columns = (
            "models",
            "one model",
            "largest tensor",
            "experts",
            "way",
            "wall time",
            "peak RSS",
            "over start",
        )
        for column in (*columns, "over / model"):
            table.add_column(column, justify="left" if column in ("models", "way") else "right")
        for label, base, experts in cases:
            model_bytes = _weights_bytes(Path(base))
            largest = _largest_tensor_bytes(Path(base))
            ways = ["streaming"] if options.skip_naive else ["streaming", "naive"]
            for way in ways:
                with console.status(f"{label}: {way}"):
                    result = _measure(
                        way, base, experts, work / f"out-{len(table.rows)}", (zoo_base, zoo_experts)
                    )
                over = max(0, result["peak_rss"] - result["start_rss"])
                table.add_row(
                    label,
                    human_bytes(model_bytes),
                    human_bytes(largest),
                    str(len(experts)),
                    "streamed run_merge" if way == "streaming" else "load all, merge, save",
                    f"{result['wall_s']:.2f} s",
                    human_bytes(result["peak_rss"]),
                    human_bytes(over),
                    f"{over / model_bytes:.2f}x",
                )
        console.print(table)
        console.print(
            "'over start': peak resident memory minus the memory after imports and a warm-up merge; "
            "'over / model' in units of one model's weights. The streamed merge holds the current tensor of each "
            "model plus merge_tensor's work tensors, so its peak follows the largest tensor and the number of "
            "experts, not the number of layers; the simple way holds every model at once."
        )


if __name__ == "__main__":
    main()
