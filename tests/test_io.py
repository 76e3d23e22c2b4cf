"""The IO layer on its own: the streaming writer (round trip, shards, index, finite check) and the atomic output
folder (what --force may replace, odd targets, inputs, stale temporaries, permissions)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from expertmerge.errors import ExpertMergeError
from expertmerge.io.folder import LOCK, MANIFEST, TMP_TAG, atomic_output_dir, check_output_dir
from expertmerge.io.reader import Checkpoint
from expertmerge.io.writer import PlannedTensor, write_safetensors, write_state_dict


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 16, generator=generator),
        "b.weight": torch.randn(16, 4, generator=generator).to(torch.bfloat16),
        "c.bias": torch.randn(7, generator=generator).to(torch.float16),
        "d.ids": torch.arange(5),
        "e.mask": torch.tensor([True, False, True]),
    }


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("limit", ["5GB", 300])
def test_written_tensors_read_back_equal_with_a_correct_index(tmp_path: Path, limit: int | str) -> None:
    tensors = _tensors()
    written = write_state_dict(tmp_path, tensors, max_shard_bytes=limit)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert [f.name for f in files] == written.filenames
    read = {}
    for file in files:
        read.update(load_file(file))
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    assert written.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    if written.num_shards == 1:
        assert written.filenames == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert written.num_shards == 2  # a.weight (512 B) alone, then the rest
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == written.total_bytes
        assert {name for name in index["weight_map"]} == set(tensors)
        for name, filename in index["weight_map"].items():
            assert name in load_file(tmp_path / filename), (name, filename)
    checkpoint = Checkpoint(tmp_path, "written")  # our own reader takes it too
    assert torch.equal(checkpoint.tensor("b.weight"), tensors["b.weight"])


def test_a_tensor_written_in_pieces_equals_the_whole(tmp_path: Path) -> None:
    whole = torch.randn(3, 4, 5)
    planned = PlannedTensor("experts", (3, 4, 5), torch.float32, lambda: iter(list(whole)))
    write_safetensors(tmp_path, [planned])
    assert torch.equal(load_file(tmp_path / "model.safetensors")["experts"], whole)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensor_stops_the_export_naming_it_and_leaves_nothing(tmp_path: Path, bad: float) -> None:
    tensors = _tensors()
    tensors["b.weight"][0, :3] = bad
    out = tmp_path / "out"
    message = r"'b\.weight' holds 3 NaN/Inf value\(s\) of 64"
    with pytest.raises(ExpertMergeError, match=message), atomic_output_dir(out) as tmp:
        write_state_dict(tmp, tensors)
    assert _entries(tmp_path) == []


def test_non_finite_piece_of_a_streamed_tensor_is_found(tmp_path: Path) -> None:
    pieces = [torch.zeros(2, 2), torch.tensor([[1.0, float("inf")], [0.0, 0.0]])]
    planned = PlannedTensor("mlp.experts.down_proj", (2, 2, 2), torch.float32, lambda: iter(pieces))
    message = r"'mlp\.experts\.down_proj' holds 1 NaN/Inf"
    with pytest.raises(ExpertMergeError, match=message), atomic_output_dir(tmp_path / "out") as tmp:
        write_safetensors(tmp, [planned])
    assert _entries(tmp_path) == []


# ----------------------------------------------------------------------------------------------- folders


def _our_output(folder: Path) -> Path:
    with atomic_output_dir(folder) as tmp:
        (tmp / "weights.txt").write_text("v1")
    return folder


def test_force_replaces_our_output_but_never_a_folder_we_did_not_write(tmp_path: Path) -> None:
    ours = _our_output(tmp_path / "ours")
    assert (ours / MANIFEST).is_file()
    with atomic_output_dir(ours, force=True) as tmp:
        (tmp / "weights.txt").write_text("v2")
    assert (ours / "weights.txt").read_text() == "v2"

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(ExpertMergeError, match=r"not written by expertmerge \(no expertmerge\.json"):
        check_output_dir(theirs, force=True)
    assert _entries(theirs) == ["notes.txt"]
    assert _entries(tmp_path) == ["ours", "theirs"]  # no temporary or half-replaced folder left


def test_output_that_is_or_holds_an_input_is_refused_even_if_ours(tmp_path: Path) -> None:
    model = _our_output(tmp_path / "model")  # e.g. a previous merge used as an input
    with pytest.raises(ExpertMergeError, match="is the input"):
        check_output_dir(model, force=True, inputs=[str(model)])
    with pytest.raises(ExpertMergeError, match="contains the input"):
        check_output_dir(tmp_path, force=True, inputs=["org/hub-id", str(model / "weights.txt")])
    assert _entries(model) == [MANIFEST, "weights.txt"]


def test_odd_output_targets_are_refused(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for target, why in [
        (".", "the current folder"),
        ("..", "the current folder or one of its parents"),
        ("/", "root" if Path.home().resolve() != Path("/") else "home"),
        ("~", "home folder" if Path.home().resolve() != Path("/") else "root"),
    ]:
        with pytest.raises(ExpertMergeError, match=why):
            check_output_dir(target, force=True)
    assert _entries(work) == [] and _entries(tmp_path) == ["work"]


def test_output_under_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExpertMergeError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "afile" / "sub" / "out", force=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_output_in_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ExpertMergeError, match="cannot write"):
            check_output_dir(locked / "out", force=False)
    finally:
        locked.chmod(0o755)


def test_output_larger_than_the_free_space_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExpertMergeError, match="needed, only .* free"):
        check_output_dir(tmp_path / "out", force=False, estimated_bytes=10**18)
    assert _entries(tmp_path) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporary_folders_are_removed_and_reported_live_and_foreign_ones_kept(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    stale = tmp_path / f".out{TMP_TAG}{_dead_pid()}-abcd1234"
    live = tmp_path / f".out{TMP_TAG}{os.getppid()}-abcd1234"
    foreign = tmp_path / f".out{TMP_TAG}{_dead_pid()}-notours"  # our name, but no lock: not ours to remove
    for folder in (stale, live, foreign):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    (stale / LOCK).write_text("{}")
    (live / LOCK).write_text("{}")
    check_output_dir(out, force=False)
    assert not stale.exists() and live.exists() and foreign.exists()
    err = " ".join(capsys.readouterr().err.split())
    assert f"removed '{stale}'" in err and "no longer running" in err


def test_every_output_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            handle, name = tempfile.mkstemp(dir=tmp)  # a tempfile-style writer makes 0600 files
            os.close(handle)
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "x.json").write_text("{}")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes.pop("sub") == 0o755
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
