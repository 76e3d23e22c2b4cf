"""Peak memory and wall time of the fit's set-up (`FitRun.prepare`; `ExpertMergingModule.prepare` in checkouts
before `expertmerge.fit`) with a warm teacher cache:
the code at another checkout ("before", e.g. `git worktree add /tmp/before ffbd20f`) against this one
("after"), side by side.

    python benchmarks/prepare_memory.py                              # SmolLM2 zoo, 3 experts (configs/demo.yaml)
    python benchmarks/prepare_memory.py --before /path/to/old/checkout --repeats 3
    python benchmarks/prepare_memory.py --config configs/fit_tiny.yaml   # quick look on the tiny zoo

Each measurement runs in its own process, with `cwd` and `PYTHONPATH` set to the checkout measured, so it
imports that checkout's code (the child reports the `expertmerge` it imported). Each checkout first runs one
unmeasured `prepare` so its teacher cache is warm (the cache key may differ between checkouts). In the
measured run the peak resident memory (`VmHWM`) is reset after the libraries, the module and the datamodule
exist, so "peak" is the set-up's own high-water mark; "over start" subtracts the RSS at that point. The child
counts `from_pretrained` calls per folder: with a warm cache "after" builds the base only, "before" also
builds every expert to take its task vector. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RESULT_TAG = "RESULT_JSON "
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


# ------------------------------------------------------------------------------------------- child side


def _rss_bytes(field: str) -> int:
    """A `/proc/self/status` field (VmRSS: now, VmHWM: peak since the last reset), in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory goes back to the OS before the peak is reset
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _child(config: str, overrides: list[str]) -> None:
    import importlib
    import time

    from transformers import PreTrainedModel

    import expertmerge

    try:
        fit = importlib.import_module("expertmerge.cli.fit")
    except ModuleNotFoundError:  # a "before" checkout from when the CLI was one module (ffbd20f)
        fit = importlib.import_module("expertmerge.cli")

    loads: list[str] = []
    original = PreTrainedModel.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        loads.append(str(Path(path).resolve()))
        return original(cls, path, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(counting)
    if hasattr(fit, "read_fit_config"):  # the learned merge as a library (`expertmerge.fit`)
        parsed = fit.read_fit_config(config, overrides)
        run = parsed.model.run
        run.datamodule = parsed.datamodule
        prepare = run.prepare
    else:  # checkouts before it: the Lightning module prepared itself
        # `configured` was public API there; older checkouts named it `_configured`.
        configured = getattr(fit, "configured", None) or fit._configured
        module, datamodule = configured(config, overrides)

        def prepare():
            module.prepare(datamodule)
            return module

    _reset_peak()
    start = _rss_bytes("VmRSS")
    started = time.perf_counter()
    prepared = prepare()
    wall = time.perf_counter() - started
    peak = _rss_bytes("VmHWM")
    base = str(Path(prepared.pool.base_dir).resolve())
    # a prepared merge keeps the teacher statistics with its calibration data; the old module held them
    stats = prepared.calibration.teacher_stats if hasattr(prepared, "calibration") else prepared.teacher_stats
    result = {
        "wall_s": wall,
        "peak_rss": peak,
        "start_rss": start,
        "expert_models_built": sum(1 for path in loads if path != base),
        "teacher_computed": stats.computed,
        "teacher_reused": stats.reused,
        "code": str(Path(expertmerge.__file__).resolve().parents[1]),
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent side


def _run(checkout: Path, config: str, overrides: list[str], threads: int) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": str(threads),
    }
    completed = subprocess.run(
        [
            sys.executable,
            str(HERE),
            "--child",
            "--config",
            config,
            *(["--"] + overrides if overrides else []),
        ],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            if Path(result["code"]) != checkout.resolve():
                raise SystemExit(f"the child meant for {checkout} imported the code at {result['code']}")
            return result
    raise SystemExit(f"prepare at {checkout} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}")


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="a fit config")
    parser.add_argument(
        "--before",
        help="checkout of the code to compare against (ffbd20f: task vectors from whole expert models)",
    )
    parser.add_argument(
        "--after", default=str(REPO), help="checkout of the code measured (default: this one)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="measured runs per checkout (median shown)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads in the measuring processes")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="fit options after `--`, e.g. -- --model.alpha0 0.2")
    options = parser.parse_args()
    config = str(Path(options.config).resolve())
    if options.child:
        _child(config, options.overrides)
        return
    if not options.before:
        parser.error("--before DIR: a checkout of the code to compare against (e.g. ffbd20f)")

    from rich.table import Table

    from expertmerge.console import make_console

    console = make_console()
    sides = {"before": Path(options.before).resolve(), "after": Path(options.after).resolve()}
    results: dict[str, list[dict]] = {}
    for label, checkout in sides.items():
        with console.status(f"{label}: warming the teacher cache ({checkout})"):
            _run(checkout, config, options.overrides, options.threads)
    for repeat in range(options.repeats):
        for label, checkout in sides.items():  # interleaved, so a load change hits both sides alike
            with console.status(f"{label}: measuring prepare, run {repeat + 1}/{options.repeats}"):
                results.setdefault(label, []).append(
                    _run(checkout, config, options.overrides, options.threads)
                )

    def median(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    table = Table(
        title=f"prepare() with a warm teacher cache: {Path(config).name} (each run a fresh process)"
    )
    for column in ("", "before", "after", "after / before"):
        table.add_column(column, justify="left" if not column else "right")
    rows = [
        ("peak RSS", "peak_rss", _mib),
        ("peak over start", None, _mib),
        ("wall time", "wall_s", lambda v: f"{v:.1f} s"),
        ("expert models built", "expert_models_built", lambda v: f"{v:.0f}"),
    ]
    for name, key, fmt in rows:
        if key is None:
            before, after = (median(s, "peak_rss") - median(s, "start_rss") for s in ("before", "after"))
        else:
            before, after = median("before", key), median("after", key)
        ratio = f"{after / before:.2f}" if before else "-"
        table.add_row(name, fmt(before), fmt(after), ratio)
    reused = {s: f"{results[s][-1]['teacher_computed']} / {results[s][-1]['teacher_reused']}" for s in sides}
    table.caption = (
        f"teacher targets computed / reused: before {reused['before']}, after {reused['after']}; "
        f"before = {sides['before']}, after = {sides['after']}; {options.repeats} run(s) each, "
        f"{options.threads} thread(s)"
    )
    console.print(table)
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
