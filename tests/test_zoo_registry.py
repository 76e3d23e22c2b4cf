"""`zoo://` through the registry: registration, entry-point discovery, the build cache, and a core that
never imports the demo zoos' package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertmerge.cli import main
from expertmerge.errors import ExpertMergeError
from expertmerge.zoo_registry import (
    ZooBuilder,
    ensure_zoo,
    register_zoo,
    resolve_path,
    unregister_zoo,
    zoo_builder,
    zoo_names,
)

REPO = Path(__file__).resolve().parents[1]
CORE_PACKAGES = ("expertmerge", "lightning_modules", "calib_data")


class ManifestOnlyZoo:
    """A zoo builder that writes just a manifest (with a loss table) and counts its builds."""

    def __init__(self, version: int = 1, losses: bool = True) -> None:
        self.builds: list[Path] = []
        self.version = version
        self.losses = losses

    def __call__(self, out: Path, seed: int = 0) -> Path:
        self.builds.append(out)
        out.mkdir(parents=True)
        manifest = {
            "name": "manifest-only",
            "builder_version": self.version,
            "seed": seed,
            "tasks": {"a": {}, "b": {}},
            "heldout_loss": {"a": {"base": 2.0, "a": 1.0, "b": 2.5}, "b": {"base": 3.0, "a": 3.5, "b": 1.5}},
            "build_seconds": 0.0,
        }
        if not self.losses:  # a reference model's zoo (e.g. the mixture fine-tune): no experts to compare
            del manifest["heldout_loss"]
        (out / "zoo.json").write_text(json.dumps(manifest))
        return out


@pytest.fixture
def manifest_only_zoo(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EXPERTMERGE_CACHE", str(tmp_path / "cache"))
    build = ManifestOnlyZoo()
    register_zoo("manifest-only", ZooBuilder(build=build, version=1))
    yield build
    unregister_zoo("manifest-only")


def test_ensure_zoo_builds_once_and_rebuilds_on_a_new_builder_version(manifest_only_zoo, tmp_path) -> None:
    folder = ensure_zoo("manifest-only")
    assert folder == tmp_path / "cache" / "zoo" / "manifest-only"
    assert resolve_path("zoo://manifest-only/experts/a") == str(folder / "experts" / "a")
    assert len(manifest_only_zoo.builds) == 1
    manifest_only_zoo.version = 2
    register_zoo("manifest-only", ZooBuilder(build=manifest_only_zoo, version=2))
    assert ensure_zoo("manifest-only") == folder
    assert ensure_zoo("manifest-only") == folder
    assert len(manifest_only_zoo.builds) == 2  # rebuilt once for version 2, then reused
    assert json.loads((folder / "zoo.json").read_text())["builder_version"] == 2


def test_an_unknown_zoo_names_the_registered_ones(manifest_only_zoo) -> None:
    with pytest.raises(ExpertMergeError, match=r"Unknown zoo 'nope'") as raised:
        resolve_path("zoo://nope/base")
    named = str(raised.value).split("registered zoos: ")[1].split(". ")[0].split(", ")
    assert named == sorted(zoo_names()) and {"manifest-only", "smollm2", "tiny"} <= set(named)


def test_the_demo_zoos_are_discovered_through_the_declared_entry_points() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split('[project.entry-points."expertmerge.zoos"]\n')[1].split("\n\n")[0]
    assert section.splitlines() == [
        'tiny = "expertmerge_zoos.tiny:ZOO"',
        'smollm2 = "expertmerge_zoos.smollm2:ZOO"',
        'diffinit = "expertmerge_zoos.diffinit:ZOO"',
        'smollm2_full = "expertmerge_zoos.smollm2_full:ZOO"',
        'smollm2_mixture = "expertmerge_zoos.mixture:SMOLLM2_MIXTURE"',
        'smollm2_full_mixture = "expertmerge_zoos.mixture:SMOLLM2_FULL_MIXTURE"',
        'gemma3_full = "expertmerge_zoos.gemma3_full:ZOO"',
        'skills = "expertmerge_zoos.skills:ZOO"',
    ]
    # Installed metadata lags pyproject.toml until `pip install -e .` runs again.
    assert {"tiny", "smollm2"} <= set(zoo_names()), "stale install: run `pip install -e .`"
    from expertmerge_zoos import smollm2, tiny

    # The versions key the cached zoos: changing one rebuilds every user's zoo of that name.
    assert zoo_builder("tiny") is tiny.ZOO and tiny.ZOO.version == 2
    assert zoo_builder("smollm2") is smollm2.ZOO and smollm2.ZOO.version == 1


def test_the_zoo_command_shows_a_registered_zoos_loss_table(manifest_only_zoo, tmp_path, capsys) -> None:
    assert main(["zoo", "--name", "manifest-only", "--out", str(tmp_path / "mine"), "--seed", "3"]) == 0
    assert manifest_only_zoo.builds == [tmp_path / "mine"]
    printed = capsys.readouterr().out
    assert "zoo 'manifest-only'" in printed and "-50%" in printed  # expert a: 1.0 against the base's 2.0
    assert main(["zoo", "--name", "manifest-only", "--out", str(tmp_path / "mine")]) == 0
    assert len(manifest_only_zoo.builds) == 1  # a current zoo in --out is reused


def test_the_zoo_command_shows_a_zoo_without_a_loss_table(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EXPERTMERGE_CACHE", str(tmp_path / "cache"))
    register_zoo("reference-only", ZooBuilder(build=ManifestOnlyZoo(losses=False), version=1))
    try:
        assert main(["zoo", "--name", "reference-only"]) == 0
    finally:
        unregister_zoo("reference-only")
    printed = capsys.readouterr().out
    assert "zoo folder:" in printed and "held-out loss" not in printed


def test_the_zoo_command_rejects_an_unknown_zoo_in_one_line(capsys) -> None:
    assert main(["zoo", "--name", "nope"]) == 2
    error = capsys.readouterr().err
    assert "Unknown zoo 'nope'" in error and len(error.strip().splitlines()) == 1
    named = error.split("registered zoos: ")[1].split(". ")[0].split(", ")
    assert named == sorted(zoo_names()) and {"smollm2", "tiny"} <= set(named)


def test_the_core_never_names_the_zoo_package() -> None:
    """Not imported, not loaded by name either (`importlib.import_module`): the core knows zoos only through
    the registry and its entry points."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for package in CORE_PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "expertmerge_zoos" in line
    ]
    assert offenders == []
