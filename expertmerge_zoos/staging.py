"""One way to build a zoo: in a staging folder beside its target, seeded, renamed into place when complete.

Both zoos build through `staged_build`, so an interrupted build never leaves a half zoo where `ensure_zoo`
looks, and a killed build's staging folder (gigabytes for SmolLM2) is removed by the next build.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from expertmerge.errors import ExpertMergeError
from expertmerge.zoo_registry import MANIFEST_NAME


def remove_dead_stagings(out: Path) -> None:
    """Staging folders of builds whose process is gone (killed: no cleanup ran) hold gigabytes; drop them."""
    for staging in out.parent.glob(f".{out.name}.partial-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


@contextlib.contextmanager
def staged_build(out: Path, seed: int) -> Iterator[Path]:
    """Yield an empty staging folder for the zoo `out` (which must not exist); rename it to `out` on success.

    Inside, torch's global RNG is seeded with `seed` (model initialisation draws from it) without
    disturbing the caller's random state, torch uses every CPU this process may run on, and transformers'
    own progress bars and warnings are off (the build shows one rich bar). All of it is restored after.
    """
    import transformers

    out = Path(out)
    if out.exists():
        raise ExpertMergeError(f"Zoo folder '{out}' already exists; remove it or pick another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    remove_dead_stagings(out)
    threads = torch.get_num_threads()
    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        staging.mkdir()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield staging
        if not (staging / MANIFEST_NAME).is_file():
            raise ExpertMergeError(f"zoo build into '{out}' wrote no {MANIFEST_NAME}")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity(verbosity)


def write_manifest(folder: Path, manifest: dict[str, Any], build_seconds: float) -> None:
    """The zoo's `zoo.json`: `ensure_zoo` compares its `builder_version` with the registered builder's.

    Every zoo's manifest also says how long the build took and with which torch / transformers / threads.
    """
    import torch
    import transformers

    manifest = {
        **manifest,
        "build_seconds": build_seconds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")


@contextlib.contextmanager
def build_steps(console: Console, zoo: str, first: str, total: int) -> Iterator[Callable[[str], None]]:
    """A rich bar of `total` build steps; the yielded `advance(next_step)` completes one and names the next."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        bar = progress.add_task(f"{zoo} zoo: {first}", total=total)

        def advance(next_step: str) -> None:
            progress.update(bar, advance=1, description=f"{zoo} zoo: {next_step}")

        yield advance


@dataclass
class Timer:
    """Wall time per build phase (`lap`) and in total, in seconds, for the manifest."""

    started: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self._last, 2)
        self._last = now

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.started, 2)
