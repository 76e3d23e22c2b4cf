"""Every command's file arguments pointed at its inputs (issue 29): each case is a one-line error (exit 2) before
any work, and not one byte of the input tree changes.

The input tree is a copy of the tiny test models (base, three experts) with calibration jsonl and csv files with the configs of every
command over it, and links into it from beside it. Each output argument is pointed at an input file, an input
folder, a path inside an input folder, links to those, and a dangling link; each input argument at a folder,
a file of the wrong kind and a dangling link. The commands run in-process: the checks come before any model
loads, so the whole grid takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from expertmerge.cli import main

TASKS = ("arith", "reverse", "sort")


def _tree_state(root: Path) -> dict[str, str]:
    """Every file's checksum and every link's target under `root`: what must not change."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[key] = "link:" + os.readlink(path)
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "folder"
    return state


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    tree = root / "inputs"
    shutil.copytree(tiny_models.base, tree / "base")
    for task, name in zip(TASKS, ("alpha", "beta", "gamma"), strict=True):
        shutil.copytree(tiny_models.experts[name], tree / "experts" / task)
    (tree / "data").mkdir()
    for task in TASKS:
        lines = [json.dumps({"text": f"{task} sample {i}: {i} {i + 1} {i + 2}"}) for i in range(16)]
        (tree / "data" / f"{task}_calib.jsonl").write_text("\n".join(lines) + "\n")
    (tree / "data" / "arith_calib.csv").write_text("text\n1+1=2\n2+2=4\n")
    base, experts = str(tree / "base"), {t: str(tree / "experts" / t) for t in TASKS}
    calib = {t: str(tree / "data" / f"{t}_calib.jsonl") for t in TASKS}
    fit = {
        "model": {"base": base, "experts": experts},
        "data": {
            "tasks": [{"name": t, "expert": t, "sources": [calib[t]]} for t in TASKS],
            "samples_per_task": 8,
            "eval_samples_per_task": 4,
            "max_length": 32,
            "batch_size": 4,
        },
        "trainer": {"max_steps": 1, "default_root_dir": str(root / "logs")},
    }
    merge = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": experts[t], "parameters": {"weight": 0.5}} for t in TASKS],
    }
    moe = {
        "base_model": base,
        "gate_mode": "random",
        "experts": [{"source_model": experts[t]} for t in TASKS],
    }
    symphony = {"experts": experts, "data": fit["data"], "moe": {"router_tuning_steps": 0}}
    for name, config in (("fit", fit), ("merge", merge), ("moe", moe), ("symphony", symphony)):
        (tree / f"{name}.yaml").write_text(yaml.safe_dump(config))
    (tree / "fit.ckpt").write_bytes(b"not read: the outputs are checked first")
    links = root / "links"
    links.mkdir()
    (links / "expert").symlink_to(tree / "experts" / "arith")
    (links / "calib").symlink_to(tree / "data" / "arith_calib.jsonl")
    (links / "dangling").symlink_to(root / "nowhere" / "out")
    return root


# What each output argument is pointed at (relative to the fuzz root).
OUTPUT_TARGETS = {
    "calibration file": "inputs/data/arith_calib.jsonl",
    "calibration csv": "inputs/data/arith_calib.csv",
    "config file": "inputs/fit.yaml",
    "base folder": "inputs/base",
    "expert folder": "inputs/experts/arith",
    "expert's config.json": "inputs/experts/arith/config.json",
    "inside an expert folder": "inputs/experts/arith/out",
    "inside the base folder": "inputs/base/sub/out",
    "link to an expert": "links/expert",
    "inside a link to an expert": "links/expert/out",
    "link to a calibration file": "links/calib",
    "dangling link": "links/dangling",
}
# zoo has no inputs: a new path inside a model folder is a fine place for a zoo there; what exists is not.
ZOO_TARGETS = {k: v for k, v in OUTPUT_TARGETS.items() if "inside" not in k}

# command line over the fuzz root `R`, with `{T}` where the argument under test goes
OUTPUT_COMMANDS = {
    "merge --out": ["merge", "--config", "{R}/inputs/merge.yaml", "--out", "{T}", "--no-progress"],
    "merge --out --force": ["merge", "--config", "{R}/inputs/merge.yaml", "--out", "{T}", "--force"],
    "moe --out": ["moe", "--config", "{R}/inputs/moe.yaml", "--out", "{T}", "--force", "--no-progress"],
    "symphony --out": ["symphony", "--config", "{R}/inputs/symphony.yaml", "--out", "{T}", "--force"],
    "fit --export.output_dir": [
        "fit",
        "--config",
        "{R}/inputs/fit.yaml",
        "--export.output_dir",
        "{T}",
        "--export.force",
        "true",
    ],
    "export --out": [
        "export",
        "--config",
        "{R}/inputs/fit.yaml",
        "--ckpt_path",
        "{R}/inputs/fit.ckpt",
        "--out",
        "{T}",
        "--force",
    ],
    "evaluate --json": ["evaluate", "--config", "{R}/inputs/fit.yaml", "--json", "{T}", "--force"],
    "sweep --output_dir": [
        "sweep",
        "--config",
        "{R}/inputs/fit.yaml",
        "--task_weights",
        "arith=1",
        "--output_dir",
        "{T}",
        "--force",
    ],
    "zoo --out": ["zoo", "--name", "tiny", "--out", "{T}", "--force"],
}
# Input arguments pointed at the wrong kind of thing.
INPUT_TARGETS = {
    "folder": "inputs/experts/arith",
    "calibration file": "inputs/data/arith_calib.jsonl",
    "dangling link": "links/dangling",
}
INPUT_COMMANDS = {
    "merge --config": ["merge", "--config", "{T}", "--out", "{R}/out"],
    "moe --config": ["moe", "--config", "{T}", "--out", "{R}/out"],
    "symphony --config": ["symphony", "--config", "{T}", "--out", "{R}/out"],
    "fit --config": ["fit", "--config", "{T}", "--export.output_dir", "{R}/out"],
    "evaluate --config": ["evaluate", "--config", "{T}"],
    "evaluate --model": ["evaluate", "--config", "{R}/inputs/fit.yaml", "--model", "{T}"],
    "export --ckpt_path": [
        "export",
        "--config",
        "{R}/inputs/fit.yaml",
        "--ckpt_path",
        "{T}",
        "--out",
        "{R}/out",
    ],
    "plan --config": ["plan", "--config", "{T}"],
    "sweep --config": ["sweep", "--config", "{T}", "--task_weights", "arith=1", "--output_dir", "{R}/out"],
}


def _run(command: list[str], root: Path, target: str, capsys) -> tuple[int, str]:
    argv = [part.replace("{R}", str(root)).replace("{T}", str(root / target)) for part in command]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def _cases(commands: dict, targets: dict) -> list[tuple[str, str]]:
    skip = {("zoo --out", k) for k in OUTPUT_TARGETS if k not in ZOO_TARGETS}
    return [(c, t) for c in commands for t in targets if (c, t) not in skip]


def _check_grid(inputs: Path, commands: dict, targets: dict, capsys) -> None:
    before = _tree_state(inputs)
    failures = []
    for command, target in _cases(commands, targets):
        code, err = _run(commands[command], inputs, targets[target], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        clean = code == 2 and any(line.startswith("error:") for line in lines) and "Traceback" not in err
        after = _tree_state(inputs)
        if not clean or after != before:
            changed = sorted(set(before.items()) ^ set(after.items()))[:3]
            failures.append(f"{command} -> {target}: exit {code}, {err.strip()[:200]!r}, changed {changed}")
            before = after
    assert failures == [], "\n".join(failures)
    assert not (inputs / "nowhere").exists() and not (inputs / "out").exists()


def test_every_output_argument_pointed_at_an_input_is_a_clean_error_and_changes_nothing(
    inputs: Path, capsys
) -> None:
    _check_grid(inputs, OUTPUT_COMMANDS, OUTPUT_TARGETS, capsys)


def test_every_input_argument_pointed_at_the_wrong_thing_is_a_clean_error_and_changes_nothing(
    inputs: Path, capsys
) -> None:
    _check_grid(inputs, INPUT_COMMANDS, INPUT_TARGETS, capsys)
