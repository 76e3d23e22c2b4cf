"""Outputs of the commands (issue 18): finite or nothing, --force replaces only what we wrote, no orphans after a
SIGKILL, fail before work, usual permissions; and the dense export of a fit equals the in-memory merge."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from expertmerge.cli import main
from expertmerge.io.folder import TMP_TAG

REPO = Path(__file__).resolve().parents[1]
FIT_CONFIG = str(REPO / "configs" / "fit_tiny.yaml")


def _merge_config(tiny_models, tmp_path: Path, experts=None, **parameters) -> Path:
    experts = experts or [tiny_models.experts[name] for name in ("alpha", "beta")]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_models.base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts],
        "parameters": parameters,
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_force_onto_an_input_model_folder_refuses_and_leaves_it_byte_identical(
    tiny_models, tmp_path: Path, capsys
) -> None:
    expert = tiny_models.experts["alpha"]
    before = _hashes(expert)
    config = _merge_config(tiny_models, tmp_path)
    code = main(["merge", "--config", str(config), "--out", str(expert), "--force", "--no-progress"])
    assert code == 2
    assert f"Output folder '{expert}' is the input" in _err(capsys)
    assert _hashes(expert) == before and _leftovers(expert.parent) == []


def test_force_onto_a_folder_we_did_not_write_refuses_and_onto_our_output_replaces(
    tiny_models, tmp_path: Path, capsys
) -> None:
    config = _merge_config(tiny_models, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["merge", "--config", str(config), "--out", str(mine), "--force", "--no-progress"]) == 2
    assert "was not written by expertmerge" in _err(capsys)
    assert _hashes(mine) == {"thesis.tex": hashlib.sha256(b"years of work").hexdigest()}

    out = tmp_path / "merged"
    assert main(["merge", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    first = load_file(out / "model.safetensors")
    assert main(["merge", "--config", str(config), "--out", str(out), "--force", "--no-progress"]) == 0
    again = load_file(out / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert _leftovers(tmp_path) == []


def test_merge_into_the_current_folder_is_refused_and_leaves_no_temporary(
    tiny_models, tmp_path: Path, monkeypatch, capsys
) -> None:
    config = _merge_config(tiny_models, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["merge", "--config", str(config), "--out", ".", "--force", "--no-progress"]) == 2
    assert "is the current folder" in _err(capsys)
    assert list(work.iterdir()) == [] and _leftovers(tmp_path) == []


@pytest.mark.parametrize("parameters", [{"lambda": float("inf")}, {"lambda": float("nan")}])
def test_merge_producing_non_finite_values_fails_and_leaves_nothing(
    tiny_models, tmp_path: Path, capsys, parameters: dict
) -> None:
    config = _merge_config(tiny_models, tmp_path, **parameters)
    out = tmp_path / "out"
    assert main(["merge", "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    message = _err(capsys)  # the config check refuses it before work; the writer's check is the last net
    assert "parameters.lambda" in message and "finite" in message
    assert not out.exists() and _leftovers(tmp_path) == []


def test_merge_of_an_expert_with_a_nan_tensor_fails_naming_it_and_leaves_nothing(
    tiny_models, tmp_path: Path, capsys
) -> None:
    import shutil

    broken = shutil.copytree(tiny_models.experts["beta"], tmp_path / "beta")
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, :2] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    config = _merge_config(tiny_models, tmp_path, experts=[tiny_models.experts["alpha"], broken])
    out = tmp_path / "out"
    assert main(["merge", "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    err = _err(capsys)
    assert "'model.layers.1.mlp.up_proj.weight' holds 2 NaN/Inf" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_sigkilled_merge_leaves_a_temporary_folder_that_the_next_run_removes(
    tiny_models, tmp_path: Path, capsys
) -> None:
    config = _merge_config(tiny_models, tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "expertmerge", "merge", "--config", str(config), "--out", str(out)]
    env = {**_env(), "EXPERTMERGE_TEST_WRITE_DELAY": "0.5"}  # sleep after each tensor: time to kill it
    process = subprocess.Popen([*command, "--no-progress"], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    temporaries: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        temporaries = [p for p in tmp_path.glob(f".out{TMP_TAG}*") if (p / "model.safetensors").exists()]
        if temporaries:
            break
        time.sleep(0.1)
    assert temporaries, "the merge never started writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert temporaries[0].is_dir() and not out.exists()  # killed outright: nothing could clean up

    assert main(["merge", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    assert f"removed '{temporaries[0]}'" in _err(capsys)
    assert _leftovers(tmp_path) == [] and (out / "model.safetensors").is_file()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_merge_and_moe_outputs_get_the_usual_permissions(tiny_models, tmp_path: Path) -> None:
    from expertmerge.moe import write_moe_checkpoint
    from expertmerge.moe.checkpoint import expert_shared_tensors
    from expertmerge.pool import ExpertPool

    previous = os.umask(0o022)
    try:
        config = _merge_config(tiny_models, tmp_path)
        assert (
            main(["merge", "--config", str(config), "--out", str(tmp_path / "merged"), "--no-progress"]) == 0
        )
        pool = ExpertPool(str(tiny_models.base), {n: str(p) for n, p in tiny_models.experts.items()})
        routers = torch.randn(2, len(tiny_models.experts), 32)
        write_moe_checkpoint(pool, tmp_path / "moe", expert_shared_tensors(pool, "base"), routers)
    finally:
        os.umask(previous)
    for out in (tmp_path / "merged", tmp_path / "moe"):
        modes = {p.name: _mode(p) for p in out.iterdir()}
        assert set(modes.values()) == {0o644}, (out.name, modes)
        assert _mode(out) == 0o755


def test_fit_whose_output_parent_is_a_file_fails_before_any_work(tiny_zoo, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    started = time.perf_counter()
    code = main(
        [
            "fit",
            "--config",
            FIT_CONFIG,
            "--export.output_dir",
            str(tmp_path / "afile" / "out"),
            "--trainer.default_root_dir",
            str(tmp_path / "logs"),
        ]
    )
    elapsed = time.perf_counter() - started
    assert code == 2
    assert "is a file, not a folder" in _err(capsys)
    assert elapsed < 30, elapsed  # a fit (teacher passes, training) takes far longer on the tiny zoo
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no logs, no outputs


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_fit_whose_output_parent_is_read_only_fails_before_any_work(tiny_zoo, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = main(["fit", "--config", FIT_CONFIG, "--export.output_dir", str(locked / "out")])
    finally:
        locked.chmod(0o755)
    assert code == 2 and "cannot write" in _err(capsys)


def test_dense_export_reloads_to_the_in_memory_merge_with_usual_permissions(tiny_zoo, tmp_path: Path) -> None:
    """The writer path gives the same tensor names as `save_pretrained` and the same logits as the module."""
    from transformers import AutoModelForCausalLM

    from expertmerge.cli.fit import read_fit_config
    from expertmerge.fit.outputs import export_dense

    config = read_fit_config(FIT_CONFIG, ["--trainer.default_root_dir", str(tmp_path / "logs")])
    datamodule = config.datamodule
    config.model.run.datamodule = datamodule
    learned = config.model.run.prepare()
    module = learned.merged
    with torch.no_grad():  # move the coefficients off alpha0, so the merge is not plain task arithmetic
        for parameter in module.coefficients.parameters():
            parameter.add_(torch.linspace(-1, 1, parameter.numel()).view_as(parameter))
    previous = os.umask(0o022)
    try:
        out = export_dense(learned, tmp_path / "dense", force=False)
    finally:
        os.umask(previous)
    assert {p.name: _mode(p) for p in out.iterdir() if _mode(p) != 0o644} == {}

    # what the old path (save_pretrained of the merged state) writes: the same names and values
    state = dict(module.model.state_dict())
    state.update({n: t.detach() for n, t in module.merged_parameters().items()})
    module.model.save_pretrained(tmp_path / "reference", state_dict=state)
    ours, reference = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "reference" / "model.safetensors"),
    )
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name].to(ours[name].dtype)), name

    samples = datamodule.task_samples(learned.task_names[0], "eval")
    ids, mask = samples.input_ids[:4], samples.attention_mask[:4]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = module(ids, mask, output_hidden_states=False).logits
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ issue 29: no input overwritten or deleted
def test_output_inside_an_input_folder_is_refused_also_through_a_symlink(
    tiny_models, tmp_path: Path, capsys
) -> None:
    expert = tiny_models.experts["alpha"]
    before = _hashes(expert)
    config = _merge_config(tiny_models, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(expert)
    for out in (expert / "merged", link / "merged", link):
        code = main(["merge", "--config", str(config), "--out", str(out), "--no-progress"])
        assert code == 2, out
        message = _err(capsys)
        assert f"Output folder '{out}'" in message and (
            "inside the input folder" in message or "is the input" in message
        )
    assert _hashes(expert) == before and _leftovers(expert.parent) == []


def test_a_dangling_symlink_as_output_is_refused_and_its_target_not_created(
    tiny_models, tmp_path: Path, capsys
) -> None:
    config = _merge_config(tiny_models, tmp_path)
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "elsewhere" / "merged")
    assert main(["merge", "--config", str(config), "--out", str(link), "--no-progress"]) == 2
    assert f"Output folder '{link}' is a dangling symbolic link" in _err(capsys)
    assert not (tmp_path / "elsewhere").exists() and link.is_symlink()


class _FailingWrites:
    """`open` for the safetensors writer: real files whose writes fail with `error` after `budget` bytes."""

    def __init__(self, error: BaseException, budget: int) -> None:
        self.error, self.budget, self.written = error, budget, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 - the writer closes it
        real_write = handle.write

        def write(data) -> int:
            if self.written + len(data) > self.budget:
                raise self.error
            self.written += len(data)
            return real_write(data)

        handle.write = write
        return handle


def test_disk_full_while_writing_is_one_line_naming_the_output_and_leaves_nothing(
    tiny_models, tmp_path: Path, monkeypatch, capsys
) -> None:
    import errno

    from expertmerge.io import writer

    config = _merge_config(tiny_models, tmp_path)
    out = tmp_path / "merged"
    failing = _FailingWrites(OSError(errno.ENOSPC, "No space left on device"), budget=20_000)
    monkeypatch.setattr(writer, "open", failing, raising=False)
    assert main(["merge", "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    message = _err(capsys)
    assert message.startswith(f"error: Output folder '{out}': the disk filled up while writing (")
    assert "needed" in message and "nothing was written" in message
    assert failing.written > 0 and not out.exists() and _leftovers(tmp_path) == []


def test_ctrl_c_while_writing_exits_130_without_a_traceback_and_leaves_nothing(
    tiny_models, tmp_path: Path, monkeypatch, capsys
) -> None:
    from expertmerge.io import writer

    config = _merge_config(tiny_models, tmp_path)
    out = tmp_path / "merged"
    monkeypatch.setattr(writer, "open", _FailingWrites(KeyboardInterrupt(), budget=20_000), raising=False)
    assert main(["merge", "--config", str(config), "--out", str(out), "--no-progress"]) == 130
    assert _err(capsys) == f"interrupted; nothing written at {out}"
    assert not out.exists() and _leftovers(tmp_path) == []


def test_free_space_estimate_counts_the_support_files(tiny_models) -> None:
    from expertmerge.io.support import EXTRA_FILES_BYTES, SUPPORT_FILES, support_bytes

    base = tiny_models.base
    files = [base / name for name in (*SUPPORT_FILES, "config.json") if (base / name).is_file()]
    assert any(f.name == "tokenizer.json" for f in files)
    assert support_bytes(base) == sum(f.stat().st_size for f in files) + EXTRA_FILES_BYTES


def test_evaluate_json_never_replaces_an_input_or_a_file_it_did_not_write(
    tiny_models, tmp_path: Path, capsys
) -> None:
    calibration, base_config = tmp_path / "calib.jsonl", tiny_models.base / "config.json"
    calibration.write_text("".join(f'{{"text": "sample {i}"}}\n' for i in range(12)))
    experts = {name: str(path) for name, path in tiny_models.experts.items()}
    config = tmp_path / "fit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"base": str(tiny_models.base), "experts": experts},
                "data": {
                    "tasks": [{"name": n, "expert": n, "sources": [str(calibration)]} for n in experts],
                    "samples_per_task": 4,
                    "eval_samples_per_task": 4,
                },
            }
        )
    )
    before = {p: p.read_bytes() for p in (calibration, base_config)}
    evaluate = ["evaluate", "--config", str(config), "--force", "--json"]
    assert main([*evaluate, str(calibration)]) == 2
    assert f"evaluate --json '{calibration}' is the input '{calibration}'" in _err(capsys)
    assert main([*evaluate, str(base_config)]) == 2
    assert f"evaluate --json '{base_config}' is inside the input folder" in _err(capsys)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert main([*evaluate[:-2], "--json", str(notes)]) == 2
    assert "already exists; pass --force" in _err(capsys)
    assert main([*evaluate, str(notes)]) == 2
    assert "was not written by expertmerge" in _err(capsys)
    assert notes.read_text() == '{"mine": 1}'
    assert {p: p.read_bytes() for p in before} == before


def test_write_json_output_is_atomic_marked_and_replaces_only_its_own_file(tmp_path: Path) -> None:
    import json

    from expertmerge.errors import ExpertMergeError
    from expertmerge.io.folder import FILE_MARKER, write_json_output

    target = tmp_path / "scores.json"
    previous = os.umask(0o022)
    try:
        write_json_output(target, {"base": {"x": 1.0}}, "evaluate")
        with pytest.raises(ExpertMergeError, match="already exists"):
            write_json_output(target, {"base": {"x": 2.0}}, "evaluate")
        write_json_output(target, {"base": {"x": 3.0}}, "evaluate", force=True)
    finally:
        os.umask(previous)
    data = json.loads(target.read_text())
    assert data["base"] == {"x": 3.0} and data[FILE_MARKER]["command"] == "evaluate"
    assert _mode(target) == 0o644 and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def _zoo_command(name: str, out: Path, *extra: str) -> list[str]:
    return ["zoo", "--name", name, "--out", str(out), *extra]


def test_zoo_out_replaces_only_its_own_zoo_and_writes_usual_permissions(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import json

    from expertmerge.zoo_registry import ZooBuilder, register_zoo, unregister_zoo

    def build(out: Path, seed: int = 0) -> Path:
        out.mkdir()
        (out / "weights.bin").write_bytes(b"w" * 10)
        (out / "weights.bin").chmod(0o600)  # as tempfile-style writers leave their files
        (out / "zoo.json").write_text(
            json.dumps({"name": "toy", "builder_version": version[0], "build_seconds": 0})
        )
        return out

    version = [1]
    register_zoo("toy", ZooBuilder(build=build, version=1))
    previous = os.umask(0o022)
    try:
        # a user's folder holding an old zoo.json and their own files: never removed, even with --force
        users = tmp_path / "users"
        users.mkdir()
        (users / "zoo.json").write_text(json.dumps({"name": "toy", "builder_version": 0}))
        (users / "thesis.tex").write_text("years of work")
        for extra in ((), ("--force",)):
            assert main(_zoo_command("toy", users, *extra)) == 2
            assert "was not written by `expertmerge zoo`" in _err(capsys)
        assert sorted(p.name for p in users.iterdir()) == ["thesis.tex", "zoo.json"]

        afile = tmp_path / "afile"
        afile.write_text("x")
        assert main(_zoo_command("toy", afile)) == 2
        assert f"zoo --out '{afile}' is a file, not a folder" in _err(capsys)

        out = tmp_path / "zoo"
        assert main(_zoo_command("toy", out)) == 0
        assert {p.name: _mode(p) for p in out.iterdir()} == {
            "weights.bin": 0o644,
            "zoo.json": 0o644,
            "expertmerge.json": 0o644,
        }
        register_zoo("toy", ZooBuilder(build=build, version=2))
        version[0] = 2
        assert main(_zoo_command("toy", out)) == 2  # outdated: replaced only when asked
        assert "pass --force to replace it" in _err(capsys)
        assert main(_zoo_command("toy", out, "--force")) == 0
        assert f"replaced the zoo at '{out}'" in _err(capsys)
        assert json.loads((out / "zoo.json").read_text())["builder_version"] == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "users", "zoo"]
    finally:
        os.umask(previous)
        unregister_zoo("toy")


def test_an_existing_output_names_the_force_flag_of_the_command_that_checks_it(tmp_path: Path) -> None:
    from expertmerge.errors import ExpertMergeError
    from expertmerge.io.folder import atomic_output_dir, check_output_dir

    # fit spells it `--export.force true` and rejects `--force`: the advice must be one the command accepts
    out = tmp_path / "merged"
    with atomic_output_dir(out, command="fit") as tmp:
        (tmp / "weights").write_text("w")
    with pytest.raises(ExpertMergeError, match=r"already exists; pass --export\.force true to replace it"):
        check_output_dir(out, False, force_flag="--export.force true")
    refused = pytest.raises(
        ExpertMergeError, match=r"already exists; pass --export\.force true to replace it"
    )
    with refused, atomic_output_dir(out, force_flag="--export.force true"):
        pass
    with pytest.raises(ExpertMergeError, match=r"already exists; pass --force to replace it"):
        check_output_dir(out, False)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    with pytest.raises(ExpertMergeError, match=r"so --export\.force true does not replace it"):
        check_output_dir(theirs, True, force_flag="--export.force true")
