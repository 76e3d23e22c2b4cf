"""A hostile campaign: bad inputs and attacks against every command, each run as a user would run it.

    python benchmarks/hostile.py [--work DIR] [--only SUBSTRING] [--timeout 120]

It copies the tiny zoo (built once into the cache) into a tree of inputs, then runs each case as
`python -m expertmerge ...` in its own process and classifies what happened:

- `clean error`: exit 2 with one `error: ...` line and no traceback (what every bad input must give);
- `ok`: exit 0 where the case is a valid run;
- `traceback`, `exit 0 (wrong)` (a bad input that ran to the end), `other exit`, `hang` (past --timeout);
- and, whatever the exit: `data lost` (a file of the input tree changed or went; new files are outputs), `code run` (a payload's marker file
  exists), `secret shown` (a secret line of an input file appears in the output).

A table per case and a total table go to the terminal; `--json FILE` keeps the rows. The figures of the
closing notes come from this script; it is not a test (it takes minutes: one process per case).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

SECRET = "root:$6$SECRET-LINE-DO-NOT-PRINT$hash:19000:0:99999:7:::"
MARKER_NAME = "PWNED"


@dataclass
class Case:
    name: str
    command: str
    args: list[str]
    expect: str = "error"  # "error" or "ok"
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    case: str
    command: str
    expect: str
    verdict: str
    seconds: float
    data_lost: bool
    code_run: bool
    secret_shown: bool
    last_line: str


# ----------------------------------------------------------------------------------------------- the tree


def _tree_checksums(root: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        sums[str(path.relative_to(root))] = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return sums


def _write_yaml(path: Path, value: object) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(value, sort_keys=False))
    return path


def _malicious_pickle(target: Path, marker: Path, *, checkpoint: bool) -> None:
    """A `torch.save` file whose unpickling would create `marker` (and an otherwise plausible checkpoint)."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    body = (
        {"state_dict": {}, "payload": Payload()} if checkpoint else {"model.embed_tokens.weight": Payload()}
    )
    torch.save(body, target)


def build_inputs(work: Path) -> Path:
    """Copy the tiny zoo into work/inputs and write the configs every case starts from."""
    env = {**os.environ}
    zoo = subprocess.run(
        [sys.executable, "-m", "expertmerge", "zoo", "--name", "tiny"],
        capture_output=True,
        text=True,
        env=env,
    )
    if zoo.returncode != 0:
        raise SystemExit(f"could not build the tiny zoo:\n{zoo.stderr}")
    source = Path(zoo.stdout.split("zoo folder:")[1].split("(built")[0].strip())
    inputs = work / "inputs"
    if inputs.exists():
        shutil.rmtree(inputs)
    shutil.copytree(source, inputs)
    experts = {name: str(inputs / "experts" / name) for name in ("arith", "reverse", "sort")}
    fit = {
        "model": {"base": str(inputs / "base"), "experts": experts, "alpha0": 0.3, "lr": 0.1},
        "data": {
            "tasks": [
                {"name": t, "expert": t, "sources": [str(inputs / "data" / f"{t}_calib.jsonl")]}
                for t in experts
            ],
            "samples_per_task": 16,
            "eval_samples_per_task": 8,
            "max_length": 64,
            "batch_size": 8,
        },
        "trainer": {"max_steps": 2, "accumulate_grad_batches": 3, "logger": False},
        "export": {"output_dir": str(work / "out" / "fit")},
    }
    configs = inputs / "configs"
    configs.mkdir()
    _write_yaml(configs / "fit.yaml", fit)
    _write_yaml(
        configs / "merge.yaml",
        {
            "merge_method": "ties",
            "base_model": str(inputs / "base"),
            "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in experts.values()],
            "dtype": "float32",
        },
    )
    _write_yaml(
        configs / "moe.yaml",
        {
            "base_model": str(inputs / "base"),
            "gate_mode": "random",
            "dtype": "float32",
            "experts": [{"source_model": p, "positive_prompts": ["a"]} for p in experts.values()],
        },
    )
    return inputs


def _edit_yaml(path: Path, edit: Callable[[dict], None], target: Path) -> Path:
    import yaml

    value = yaml.safe_load(path.read_text())
    edit(value)
    return _write_yaml(target, value)


# ---------------------------------------------------------------------------------------------- the cases


def cases(work: Path, inputs: Path) -> list[Case]:
    """Every case: (name, command, arguments, expected outcome, setup run before it)."""
    cfg = inputs / "configs"
    out = work / "out"
    bad = work / "bad"  # files made for one case; outside the checked input tree
    base, arith = inputs / "base", inputs / "experts" / "arith"
    calib = inputs / "data" / "sort_calib.jsonl"
    marker = work / MARKER_NAME
    fit_cfg, merge_cfg, moe_cfg = cfg / "fit.yaml", cfg / "merge.yaml", cfg / "moe.yaml"
    result: list[Case] = []

    def add(name: str, command: str, *args: str, expect: str = "error", setup=None, env=None) -> None:
        result.append(Case(name, command, [command, *map(str, args)], expect, setup, env or {}))

    def fit_variant(name: str, edit: Callable[[dict], None]) -> Path:
        target = bad / f"{name}.yaml"
        _edit_yaml(fit_cfg, edit, target)
        return target

    def merge_variant(name: str, edit: Callable[[dict], None], source: Path = merge_cfg) -> Path:
        target = bad / f"{name}.yaml"
        _edit_yaml(source, edit, target)
        return target

    bad.mkdir(parents=True, exist_ok=True)
    (bad / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (bad / "empty.yaml").write_text("")
    (bad / "list.yaml").write_text("- a\n- b\n")
    (bad / "syntax.yaml").write_text("model:\n  base: [unclosed\n  experts: {a: b\n")
    (bad / "garbage.ckpt").write_bytes(b"not a checkpoint at all" * 10)
    (bad / "empty.ckpt").write_bytes(b"")
    shadow = bad / "shadow"
    shadow.write_text(SECRET + "\nbin:*:19000:0:99999:7:::\n")
    (bad / "secret.csv").symlink_to(shadow)
    (bad / "dangling").symlink_to(work / "nowhere" / "x")
    (bad / "a_file").write_text("a user's file\n")
    (out).mkdir(exist_ok=True)

    # Code from files: a crafted checkpoint / pickle must never run.
    def evil_ckpt(_: Path) -> None:
        _malicious_pickle(bad / "evil.ckpt", marker, checkpoint=True)

    def evil_bin(_: Path) -> None:
        folder = bad / "evil_model"
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(base, folder)
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
        _malicious_pickle(folder / "pytorch_model.bin", marker, checkpoint=False)

    add(
        "fit --ckpt_path malicious",
        "fit",
        "--config",
        fit_cfg,
        "--ckpt_path",
        bad / "evil.ckpt",
        "--export.output_dir",
        out / "f1",
        setup=evil_ckpt,
    )
    add(
        "export --ckpt_path malicious",
        "export",
        "--config",
        fit_cfg,
        "--ckpt_path",
        bad / "evil.ckpt",
        "--out",
        out / "e1",
        setup=evil_ckpt,
    )
    add(
        "evaluate --model malicious .bin",
        "evaluate",
        "--config",
        fit_cfg,
        "--model",
        f"evil={bad / 'evil_model'}",
        setup=evil_bin,
    )
    add(
        "merge with a malicious .bin expert",
        "merge",
        "--config",
        bad / "merge_evil.yaml",
        "--out",
        out / "m_evil",
        setup=lambda _: (
            evil_bin(_),
            merge_variant("merge_evil", lambda v: v["models"][0].update(model=str(bad / "evil_model"))),
        ),
    )
    add(
        "fit --ckpt_path missing",
        "fit",
        "--config",
        fit_cfg,
        "--ckpt_path",
        bad / "missing.ckpt",
        "--export.output_dir",
        out / "f2",
    )
    add(
        "fit --ckpt_path garbage",
        "fit",
        "--config",
        fit_cfg,
        "--ckpt_path",
        bad / "garbage.ckpt",
        "--export.output_dir",
        out / "f3",
    )
    add(
        "fit --ckpt_path empty",
        "fit",
        "--config",
        fit_cfg,
        "--ckpt_path",
        bad / "empty.ckpt",
        "--export.output_dir",
        out / "f4",
    )
    add(
        "export --ckpt_path garbage",
        "export",
        "--config",
        fit_cfg,
        "--ckpt_path",
        bad / "garbage.ckpt",
        "--out",
        out / "e2",
    )

    # Files written over inputs.
    add("evaluate --json = calibration file", "evaluate", "--config", fit_cfg, "--json", calib)
    add("evaluate --json = base config.json", "evaluate", "--config", fit_cfg, "--json", base / "config.json")
    add("evaluate --json inside an expert", "evaluate", "--config", fit_cfg, "--json", arith / "scores.json")
    add("evaluate --json = a user's file", "evaluate", "--config", fit_cfg, "--json", bad / "a_file")
    add("evaluate --json = the config", "evaluate", "--config", fit_cfg, "--json", fit_cfg)
    add("merge --out = expert", "merge", "--config", merge_cfg, "--out", arith, "--force")
    add("merge --out inside expert", "merge", "--config", merge_cfg, "--out", arith / "merged")
    add(
        "merge --out inside expert via symlink",
        "merge",
        "--config",
        merge_cfg,
        "--out",
        bad / "link_arith" / "m",
        setup=lambda _: (bad / "link_arith").exists() or (bad / "link_arith").symlink_to(arith),
    )
    add("merge --out = base --force", "merge", "--config", merge_cfg, "--out", base, "--force")
    add("merge --out = a file", "merge", "--config", merge_cfg, "--out", bad / "a_file")
    add("merge --out dangling symlink", "merge", "--config", merge_cfg, "--out", bad / "dangling")
    add("merge --out = inputs root", "merge", "--config", merge_cfg, "--out", inputs, "--force")
    add("moe --out inside expert", "moe", "--config", moe_cfg, "--out", arith / "moe")
    add("moe --out = base --force", "moe", "--config", moe_cfg, "--out", base, "--force")
    add(
        "fit output_dir = expert",
        "fit",
        "--config",
        fit_cfg,
        "--export.output_dir",
        arith,
        "--export.force",
        "true",
    )
    add(
        "fit output_dir beside the calibration files (allowed: the folder is no input)",
        "fit",
        "--config",
        fit_cfg,
        "--export.output_dir",
        inputs / "data" / "fit",
        expect="ok",
    )
    add(
        "export --out inside base",
        "export",
        "--config",
        fit_cfg,
        "--ckpt_path",
        bad / "garbage.ckpt",
        "--out",
        base / "x",
    )
    add(
        "sweep --output_dir = expert",
        "sweep",
        "--config",
        fit_cfg,
        "--task_weights",
        "sort=0.5,1",
        "--output_dir",
        arith,
        "--force",
    )
    add(
        "zoo --out a user's folder with zoo.json",
        "zoo",
        "--name",
        "tiny",
        "--out",
        bad / "userzoo",
        setup=lambda _: (
            (bad / "userzoo").mkdir(exist_ok=True),
            (bad / "userzoo" / "zoo.json").write_text('{"name": "tiny", "version": -1}'),
            (bad / "userzoo" / "thesis.tex").write_text("years of work\n"),
        ),
    )
    add("zoo --out a file", "zoo", "--name", "tiny", "--out", bad / "a_file")

    # Config files.
    for command, extra in (
        ("fit", ()),
        ("merge", ("--out", out / "m2")),
        ("moe", ("--out", out / "o2")),
        ("evaluate", ()),
        ("symphony", ("--out", out / "s2")),
        ("plan", ()),
        ("sweep", ("--task_weights", "sort=1")),
        ("export", ("--ckpt_path", bad / "garbage.ckpt", "--out", out / "e3")),
    ):
        add(f"{command}: binary YAML", command, "--config", bad / "binary.yaml", *extra)
    for kind in ("empty", "list", "syntax"):
        add(f"fit: {kind} YAML", "fit", "--config", bad / f"{kind}.yaml")
        add(f"merge: {kind} YAML", "merge", "--config", bad / f"{kind}.yaml", "--out", out / f"m_{kind}")
    add("fit: missing config", "fit", "--config", bad / "nope.yaml")
    add("merge: missing config", "merge", "--config", bad / "nope.yaml", "--out", out / "m3")
    add(
        "fit: misspelt key in YAML",
        "fit",
        "--config",
        fit_variant("misspelt", lambda v: v["model"].update(ce_wieght=3.0)),
    )
    add("fit: unknown --model key", "fit", "--config", fit_cfg, "--model.nonexistent", "1")
    add("fit: lr abc", "fit", "--config", fit_cfg, "--model.lr", "abc")
    add("fit: lr nan", "fit", "--config", fit_cfg, "--model.lr", "nan")
    add("fit: alpha0 2", "fit", "--config", fit_cfg, "--model.alpha0", "2")
    add("fit: accumulate 0", "fit", "--config", fit_cfg, "--trainer.accumulate_grad_batches", "0")
    add(
        "fit: max_steps -5 with chunking",
        "fit",
        "--config",
        fit_cfg,
        "--model.chunking",
        "true",
        "--trainer.max_steps",
        "0",
    )
    add(
        "fit: expert name with a dot",
        "fit",
        "--config",
        fit_variant(
            "dotname",
            lambda v: (
                v["model"]["experts"].update({"a.b": v["model"]["experts"].pop("arith")}),
                v["data"]["tasks"][0].update(expert="a.b"),
            ),
        ),
    )
    add(
        "fit: task name with a slash",
        "fit",
        "--config",
        fit_variant("slashname", lambda v: v["data"]["tasks"][0].update(name="ar/ith")),
    )
    add(
        "fit: expert is the base",
        "fit",
        "--config",
        fit_variant("expertbase", lambda v: v["model"]["experts"].update(arith=str(base))),
    )
    add(
        "fit: one expert under two names",
        "fit",
        "--config",
        fit_variant("twice", lambda v: v["model"]["experts"].update(sort=str(arith))),
    )
    add(
        "fit: missing expert folder",
        "fit",
        "--config",
        fit_variant("missingexpert", lambda v: v["model"]["experts"].update(sort=str(bad / "nope"))),
    )
    add(
        "fit: task names an unknown expert",
        "fit",
        "--config",
        fit_variant("unknownexpert", lambda v: v["data"]["tasks"][0].update(expert="nobody")),
    )
    add(
        "fit: empty calibration file",
        "fit",
        "--config",
        fit_variant("emptycalib", lambda v: v["data"]["tasks"][0].update(sources=[str(bad / "empty.jsonl")])),
        setup=lambda _: (bad / "empty.jsonl").write_text(""),
    )
    add(
        "fit: csv source is a symlink to a secret",
        "fit",
        "--config",
        fit_variant("secretcsv", lambda v: v["data"]["tasks"][0].update(sources=[str(bad / "secret.csv")])),
    )
    add(
        "fit: /dev/zero as a source",
        "fit",
        "--config",
        fit_variant("devzero", lambda v: v["data"]["tasks"][0].update(sources=["/dev/zero"])),
    )
    add(
        "fit: a folder as a source",
        "fit",
        "--config",
        fit_variant("foldersource", lambda v: v["data"]["tasks"][0].update(sources=[str(bad)])),
    )
    add("fit: samples_per_task 0", "fit", "--config", fit_cfg, "--data.samples_per_task", "0")
    add("fit: max_length 1", "fit", "--config", fit_cfg, "--data.max_length", "1")
    add(
        "fit: hub id that hangs",
        "fit",
        "--config",
        fit_variant("hubid", lambda v: v["model"]["experts"].update(sort="someorg/some-model")),
        env={
            "HF_HUB_OFFLINE": "0",
            "EXPERTMERGE_HUB_TIMEOUT": "5",
            "HF_HUB_ETAG_TIMEOUT": "5",
            "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        },
    )

    # Merge / moe / symphony option values.
    add(
        "merge: weight nan",
        "merge",
        "--config",
        merge_variant("weightnan", lambda v: v["models"][0]["parameters"].update(weight=float("nan"))),
        "--out",
        out / "m4",
    )
    add(
        "merge: density 2",
        "merge",
        "--config",
        merge_variant("density2", lambda v: v["models"][0]["parameters"].update(density=2.0)),
        "--out",
        out / "m5",
    )
    add(
        "merge: unknown method",
        "merge",
        "--config",
        merge_variant("method", lambda v: v.update(merge_method="magic")),
        "--out",
        out / "m6",
    )
    add(
        "merge: the base among the models (mergekit allows it)",
        "merge",
        "--config",
        merge_variant("mergebase", lambda v: v["models"][0].update(model=str(base))),
        "--out",
        out / "m7",
        expect="ok",
    )
    add(
        "merge: passthrough of one source",
        "merge",
        "--config",
        merge_variant(
            "passthrough",
            lambda v: (
                v.update(merge_method="passthrough"),
                v.pop("base_model"),
                v.update(models=[{"model": str(arith)}]),
            ),
        ),
        "--out",
        out / "m8",
    )
    add(
        "merge: x1e37 expert (health)",
        "merge",
        "--config",
        merge_variant("huge", lambda v: v["models"][0].update(model=str(bad / "huge"))),
        "--out",
        out / "m9",
        "--strict_health",
        setup=lambda _: _scaled_expert(base, arith, bad / "huge", 1e30),
    )
    add(
        "moe: noise_scale nan",
        "moe",
        "--config",
        merge_variant("noisenan", lambda v: v["experts"][1].update(noise_scale=float("nan")), moe_cfg),
        "--out",
        out / "o3",
    )
    add(
        "moe: residual_scale inf",
        "moe",
        "--config",
        merge_variant("resinf", lambda v: v["experts"][1].update(residual_scale=float("inf")), moe_cfg),
        "--out",
        out / "o4",
    )
    add(
        "symphony: router_lr nan",
        "symphony",
        "--config",
        merge_variant(
            "symnan",
            lambda v: v.update(
                experts={"a": str(arith), "b": str(inputs / "experts" / "sort")},
                reference="a",
                data={
                    "tasks": [
                        {"name": "a", "expert": "a", "sources": [str(calib)]},
                        {"name": "b", "expert": "b", "sources": [str(calib)]},
                    ]
                },
                output="moe",
                moe={"router_lr": float("nan")},
                output_dir=str(out / "s3"),
            ),
            source=cfg / "moe.yaml",
        ),
    )

    # evaluate of broken models.
    add(
        "evaluate: NaN model",
        "evaluate",
        "--config",
        fit_cfg,
        "--model",
        f"nan={bad / 'nanmodel'}",
        setup=lambda _: _scaled_expert(base, arith, bad / "nanmodel", float("nan")),
    )
    add(
        "evaluate: other vocabulary",
        "evaluate",
        "--config",
        fit_cfg,
        "--model",
        f"v={bad / 'vocab'}",
        setup=lambda _: _other_vocab(bad / "vocab"),
    )
    add("evaluate: missing model", "evaluate", "--config", fit_cfg, "--model", bad / "nope")

    # plan.
    add("plan: --device_memory abc", "plan", "--config", fit_cfg, "--device_memory", "abc")
    add("plan: --batch_size -1", "plan", "--config", fit_cfg, "--batch_size", "-1")
    add("plan: --max_length 0", "plan", "--config", fit_cfg, "--max_length", "0")

    # Valid runs: nothing above may refuse good input.
    add("merge ok", "merge", "--config", merge_cfg, "--out", out / "ok-merge", "--force", expect="ok")
    add("moe ok", "moe", "--config", moe_cfg, "--out", out / "ok-moe", "--force", expect="ok")
    add(
        "fit ok (2 steps)",
        "fit",
        "--config",
        fit_cfg,
        "--export.output_dir",
        out / "ok-fit",
        "--export.force",
        "true",
        expect="ok",
    )
    add(
        "evaluate ok (--json new file)",
        "evaluate",
        "--config",
        fit_cfg,
        "--model",
        f"merged={out / 'ok-merge'}",
        "--json",
        out / "scores.json",
        expect="ok",
    )
    add("plan ok", "plan", "--config", fit_cfg, expect="ok")
    return result


def _scaled_expert(base: Path, expert: Path, target: Path, scale: float) -> None:
    """`target`: a copy of `expert` whose task vector is multiplied by `scale` (NaN: every weight NaN)."""
    import torch
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(expert, target)
    base_weights = load_file(str(next(base.glob("*.safetensors"))))
    for file in target.glob("*.safetensors"):
        weights = load_file(str(file))
        for name, tensor in weights.items():
            if scale != scale:
                weights[name] = torch.full_like(tensor, float("nan"))
            else:
                weights[name] = base_weights[name] + scale * (tensor - base_weights[name])
        save_file(weights, str(file), metadata={"format": "pt"})


def _other_vocab(target: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if target.exists():
        return
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(target)


# ------------------------------------------------------------------------------------------ the silent hub


def silent_server() -> tuple[str, Callable[[], None]]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a network that hangs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()

    return f"http://127.0.0.1:{server.getsockname()[1]}", close


# ---------------------------------------------------------------------------------------------- running


def classify(case: Case, code: int | None, text: str) -> str:
    if code is None:
        return "hang"
    if "Traceback (most recent call last)" in text:
        return "traceback"
    if case.expect == "ok":
        return "ok" if code == 0 else f"refused (exit {code})"
    if code == 0:
        return "exit 0 (wrong)"
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if code == 2 and len(errors) == 1:
        return "clean error"
    return f"other exit {code}"


def run_case(case: Case, work: Path, inputs: Path, timeout: float, endpoint: str) -> Outcome:
    marker = work / MARKER_NAME
    marker.unlink(missing_ok=True)
    if case.setup is not None:
        case.setup(work)
    before = _tree_checksums(inputs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": endpoint, "COLUMNS": "200", **case.env}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "expertmerge", *case.args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=work,
            stdin=subprocess.DEVNULL,
        )
        code, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        code = None
        text = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(
            errors="replace"
        )
    seconds = time.perf_counter() - started
    after = _tree_checksums(inputs)
    lines = [line for line in text.splitlines() if line.strip()]
    return Outcome(
        case=case.name,
        command=case.command,
        expect=case.expect,
        verdict=classify(case, code, text),
        seconds=round(seconds, 1),
        data_lost=any(after.get(name) != digest for name, digest in before.items()),  # changed or removed
        code_run=marker.exists(),
        secret_shown="SECRET-LINE" in text,
        last_line=(lines[-1] if lines else "")[:160],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/hostile", help="work folder (inputs are copied here)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    parser.add_argument("--json", help="write every row to this JSON file")
    options = parser.parse_args()
    work = Path(options.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    console = Console(width=200)
    inputs = build_inputs(work)
    selected = [c for c in cases(work, inputs) if options.only in c.name]
    endpoint, close = silent_server()
    outcomes = []
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("cases", total=len(selected))
            for case in selected:
                progress.update(task, description=case.name)
                outcomes.append(run_case(case, work, inputs, options.timeout, endpoint))
                progress.advance(task)
    finally:
        close()
    table = Table(title="hostile campaign: one row per case")
    for column in ("case", "verdict", "s", "lost", "code", "secret", "last line"):
        table.add_column(column, overflow="fold")
    for row in outcomes:
        good = row.verdict in ("clean error", "ok") and not (
            row.data_lost or row.code_run or row.secret_shown
        )
        style = "" if good else "bold red"
        table.add_row(
            row.case,
            row.verdict,
            f"{row.seconds:.0f}",
            "yes" if row.data_lost else "",
            "yes" if row.code_run else "",
            "yes" if row.secret_shown else "",
            row.last_line,
            style=style,
        )
    console.print(table)
    totals = Table(title="totals")
    totals.add_column("what")
    totals.add_column("count", justify="right")
    verdicts: dict[str, int] = {}
    for row in outcomes:
        verdicts[row.verdict] = verdicts.get(row.verdict, 0) + 1
    totals.add_row("cases", str(len(outcomes)))
    for verdict, count in sorted(verdicts.items()):
        totals.add_row(verdict, str(count))
    for flag in ("data_lost", "code_run", "secret_shown"):
        totals.add_row(flag.replace("_", " "), str(sum(getattr(row, flag) for row in outcomes)))
    console.print(totals)
    if options.json:
        Path(options.json).write_text(json.dumps([vars(row) for row in outcomes], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
