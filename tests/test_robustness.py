"""Interruptions: a fit killed with SIGKILL resumes to the uninterrupted result; the teacher cache survives
half-written and damaged files.

Resume semantics: Lightning restores the coefficients, Adam's state, the scheduler and the loop counters
from a checkpoint, and the calibration train loader's `state_dict` (calib_data/resume.py): the position inside
the epoch and the random states. A fit resumed from any step, mid-epoch and under gradient accumulation
included, ends where the uninterrupted fit ends (the mid-epoch tests at the end). The tiny config has 12
single-task batches per epoch and accumulates 3, i.e. 4 optimiser steps per epoch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import LEAN_FIT
from conftest import fit_args as tiny_fit_args

from expertmerge.cli import main
from expertmerge.teachers import TeacherTargets, _cache_file, load_cached, save_cached

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "fit_tiny.yaml")
STEPS_PER_EPOCH = 4  # 3 tasks x 32 samples / batch_size 8 = 12 batches, accumulate 3
TOTAL_STEPS = 6 * STEPS_PER_EPOCH


def fit_args(tmp: Path, name: str, *overrides: str) -> list[str]:
    """`python -m expertmerge` arguments of one run: constant learning rate (a resumed run's schedule cannot
    depend on max_steps), no validation and no evaluation (they do not change the coefficients), and a
    checkpoint every epoch."""
    return tiny_fit_args(
        tmp,
        name,
        "--export.evaluate",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--model.scheduler",
        "constant",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(tmp / f"{name}-checkpoints"),
        "--trainer.callbacks.every_n_train_steps",
        str(STEPS_PER_EPOCH),
        "--trainer.callbacks.save_top_k",
        "-1",
        *overrides,
    )


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_fit(tmp: Path, name: str, *overrides: str) -> Path:
    """A fit in this process (a new Trainer; saves the seconds of a fresh interpreter's imports)."""
    assert main(fit_args(tmp, name, *overrides)) == 0
    return tmp / name


def coefficients(folder: Path) -> list[float]:
    table = json.loads((folder / "coefficients.json").read_text())["coefficients"]
    return [v for tensor in sorted(table) for expert in sorted(table[tensor]) for v in table[tensor][expert]]


def checkpoint_step(path: Path) -> int:
    match = re.search(r"step=(\d+)", path.name)
    assert match, path
    return int(match.group(1))


def test_fit_killed_mid_way_resumes_from_its_last_checkpoint_to_the_uninterrupted_result(
    tiny_zoo, tmp_path: Path
) -> None:
    # A run that would go on for a long time, killed the hard way as soon as its first checkpoint exists.
    checkpoints = tmp_path / "killed-checkpoints"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "expertmerge",
                *fit_args(tmp_path, "killed", "--trainer.max_steps", "100000"),
            ],
            cwd=tmp_path,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        while not list(checkpoints.glob("*.ckpt")):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                pytest.fail(f"no checkpoint appeared:\n{(tmp_path / 'killed.log').read_text()[-4000:]}")
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "killed").exists()  # killed before its export

    last = max(checkpoints.glob("*.ckpt"), key=checkpoint_step)
    step = checkpoint_step(last)
    assert step % STEPS_PER_EPOCH == 0 and 0 < step < TOTAL_STEPS, step
    stored = torch.load(last, map_location="cpu", weights_only=True)  # complete: renamed into place
    assert stored["global_step"] == step

    resumed = run_fit(tmp_path, "resumed", "--trainer.max_steps", str(TOTAL_STEPS), "--ckpt_path", str(last))
    straight = run_fit(tmp_path, "straight", "--trainer.max_steps", str(TOTAL_STEPS))
    assert json.loads((resumed / "coefficients.json").read_text())["experts"] == ["arith", "reverse", "sort"]
    resumed_values, straight_values = coefficients(resumed), coefficients(straight)
    assert resumed_values == pytest.approx(straight_values, abs=1e-5)
    # The steps after the checkpoint mattered: the result is not simply the checkpoint's coefficients.
    names, experts = stored["expertmerge"]["coefficient_names"], stored["expertmerge"]["expert_names"]
    logits = {name: stored["state_dict"][f"coefficients.logits.{i}"] for i, name in enumerate(names)}
    at_checkpoint = [
        float(torch.sigmoid(logits[name][experts.index(expert), 0]))
        for name in sorted(names)
        for expert in sorted(experts)
    ]
    assert max(abs(a - b) for a, b in zip(at_checkpoint, straight_values, strict=True)) > 1e-3


# ----------------------------------------------------------------------------------- teacher cache


@pytest.fixture
def private_cache(tiny_zoo: Path, tmp_path: Path, monkeypatch) -> Path:
    """An empty teacher cache of our own (so damaging it touches no other test) next to the session's zoo."""
    cache = tmp_path / "cache"
    (cache / "zoo").mkdir(parents=True)
    (cache / "zoo" / tiny_zoo.name).symlink_to(tiny_zoo, target_is_directory=True)
    monkeypatch.setenv("EXPERTMERGE_CACHE", str(cache))
    return cache


def quick_fit(tmp: Path, name: str) -> Path:
    out = tmp / name
    code = main(tiny_fit_args(tmp, name, "--trainer.max_steps", "3", *LEAN_FIT))
    assert code == 0
    return out


def test_damaged_teacher_cache_entries_are_recomputed_with_a_warning(
    private_cache: Path, tmp_path: Path, capsys
) -> None:
    first = quick_fit(tmp_path, "first")
    assert "6 / 0" in capsys.readouterr().out  # computed / reused
    entries = sorted((private_cache / "teachers").glob("*.safetensors"))
    assert len(entries) == 6  # (arith, reverse, sort) x (train, eval)
    intact = {path: path.read_bytes() for path in entries}

    truncated, garbage, empty = entries[:3]
    truncated.write_bytes(intact[truncated][: len(intact[truncated]) // 2])  # a half-written file
    garbage.write_bytes(os.urandom(len(intact[garbage])))
    empty.write_bytes(b"")
    # A writer's temporary file left by a crash is never read as an entry.
    (private_cache / "teachers" / f".{entries[3].name}.deadbeef.tmp").write_bytes(b"partial")

    with pytest.warns(UserWarning, match="damaged teacher cache entry") as caught:
        second = quick_fit(tmp_path, "second")
    damaged = {
        m.group(1)
        for w in caught
        if (m := re.search(r"damaged teacher cache entry (\S+) \(", str(w.message)))
    }
    assert damaged == {str(truncated), str(garbage), str(empty)}
    assert "3 / 3" in capsys.readouterr().out  # the three damaged entries recomputed, the rest reused
    assert coefficients(second) == pytest.approx(coefficients(first), abs=1e-5)

    # The recomputed entries were written back whole (their checksums verify: no warning) and hold the same
    # targets as before the damage. Their bytes may differ: safetensors writes the metadata keys in hash-map
    # order, which changes from one process or map to the next.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reread = {path: load_cached(path.stem) for path in entries}
    for path in entries:
        if path not in (truncated, garbage, empty):
            assert path.read_bytes() == intact[path]  # untouched
            continue
        original = _read(intact[path])
        assert reread[path] is not None and reread[path].tensors.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.allclose(reread[path].tensors[name].float(), tensor.float(), atol=1e-4), name


def _read(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _targets(seed: int) -> TeacherTargets:
    generator = torch.Generator().manual_seed(seed)
    return TeacherTargets(
        {
            "hidden.1": torch.randn(4, 16, 8, generator=generator),
            "topk_values": torch.randn(4, 16, 5, generator=generator),
            "topk_indices": torch.randint(0, 50, (4, 16, 5), generator=generator, dtype=torch.int32),
        }
    )


CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from expertmerge import teachers

    real_save_file = teachers.save_file

    def save_half_then_die(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)  # the bytes that reached the disk so far
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies mid-write: no cleanup, no rename

    teachers.save_file = save_half_then_die
    generator = torch.Generator().manual_seed(int(sys.argv[2]))
    teachers.save_cached(
        sys.argv[1], teachers.TeacherTargets({"hidden.1": torch.randn(4, 16, 8, generator=generator)})
    )
    """
)


def crash_while_writing(key: str, cache: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, key, "7"],
        env={**subprocess_env(), "EXPERTMERGE_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode


def test_crash_while_writing_a_teacher_cache_entry_leaves_no_partial_file_under_its_name(
    tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXPERTMERGE_CACHE", str(cache))
    assert crash_while_writing("fresh", cache) == -signal.SIGKILL
    assert not _cache_file("fresh").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing entry is a plain miss, not a damaged one
        assert load_cached("fresh") is None

    # Rewriting an existing entry and crashing keeps the old, complete entry readable.
    old = _targets(seed=1)
    save_cached("existing", old)
    assert crash_while_writing("existing", cache) == -signal.SIGKILL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = load_cached("existing")
    assert kept is not None and kept.tensors.keys() == old.tensors.keys()
    for name, tensor in old.tensors.items():
        assert torch.equal(kept.tensors[name], tensor)


def test_error_while_writing_a_teacher_cache_entry_leaves_no_file_under_its_name(
    tmp_path: Path, monkeypatch
) -> None:
    from expertmerge import teachers

    monkeypatch.setenv("EXPERTMERGE_CACHE", str(tmp_path / "cache"))

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(teachers, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_cached("full", _targets(seed=2))
    assert not _cache_file("full").exists()
    assert load_cached("full") is None


def test_teacher_cache_entry_damaged_inside_its_data_is_not_trusted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EXPERTMERGE_CACHE", str(tmp_path / "cache"))
    save_cached("flipped", _targets(seed=3))
    path = _cache_file("flipped")
    data = bytearray(path.read_bytes())
    data[-40:] = bytes(40)  # the last tensor's last values zeroed: header and length unchanged
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged teacher cache entry"):
        assert load_cached("flipped") is None


# ----------------------------------------------------------------------------------- mid-epoch resume


def checkpoints_by_stage_and_step(logs: Path) -> dict[tuple[int, int], Path]:
    from expertmerge.fit.stages import checkpoint_stage

    return {
        (checkpoint_stage(c), torch.load(c, map_location="cpu", weights_only=True)["global_step"]): c
        for c in logs.rglob("*.ckpt")
    }


def max_difference(first: Path, second: Path) -> float:
    return max(abs(a - b) for a, b in zip(coefficients(first), coefficients(second), strict=True))


def resume_check_args(every: int, *overrides: str) -> tuple[str, ...]:
    """A fit with a checkpoint every `every` steps (Lightning's log folder, one version per stage's Trainer)."""
    return (
        *LEAN_FIT[:4],  # no evaluation, no validation; checkpoints and their callback stay on
        "--trainer.logger",
        "false",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps",
        str(every),
        "--trainer.callbacks.save_top_k",
        "-1",
        *overrides,
    )


@pytest.mark.parametrize(
    ("accumulate", "every", "steps"),
    # 12 single-task batches per epoch. Without accumulation the step-15 checkpoint is 3 batches into the second
    # epoch; accumulating 3 batches per step (4 steps per epoch), the step-6 one is 6 batches into it.
    [(1, 15, 17), (3, 6, 8)],
    ids=["one-batch-per-step", "accumulating-3"],
)
def test_layerwise_fit_resumed_mid_epoch_ends_where_the_uninterrupted_fit_ends(
    tiny_zoo, tmp_path: Path, accumulate: int, every: int, steps: int
) -> None:
    common = resume_check_args(
        every, "--trainer.max_steps", str(steps), "--trainer.accumulate_grad_batches", str(accumulate)
    )
    straight = tmp_path / "straight"
    assert main(tiny_fit_args(tmp_path, "straight", *common)) == 0
    saved = checkpoints_by_stage_and_step(tmp_path / "straight-logs")
    assert set(saved) == {(1, every)}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")
        code = main(tiny_fit_args(tmp_path, "resumed", *common, "--ckpt_path", str(saved[(1, every)])))
    assert code == 0
    assert max_difference(tmp_path / "resumed", straight) < 1e-6


def test_chunkwise_fit_resumed_mid_epoch_under_accumulation_ends_where_the_uninterrupted_fit_ends(
    tiny_zoo, tmp_path: Path
) -> None:
    # Stage 1 runs 2 steps (half an epoch), stage 2 8 steps; stage 2's step-6 checkpoint is 6 batches into
    # its second epoch (3 batches per step, 12 per epoch).
    common = resume_check_args(
        6, "--model.chunking", "true", "--trainer.max_steps", "2", "--model.stage2_steps", "8"
    )
    straight = tmp_path / "straight"
    assert main(tiny_fit_args(tmp_path, "straight", *common)) == 0
    saved = checkpoints_by_stage_and_step(tmp_path / "straight-logs")
    assert set(saved) == {(2, 6)}
    code = main(tiny_fit_args(tmp_path, "resumed", *common, "--ckpt_path", str(saved[(2, 6)])))
    assert code == 0
    assert (tmp_path / "resumed" / "chunk_allocation.json").is_file()
    assert max_difference(tmp_path / "resumed", straight) < 1e-6
