"""The layers of pyproject.toml's import-linter contracts: `lint-imports` passes on this tree (as in CI), and every
contract breaks on one import that crosses it, so that none of them holds vacuously (a forbidden contract whose
forbidden module lies inside its source package, for one, never fails)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]

# One import per contract that the contract forbids (importer, imported): each stands for a layer break the
# contract is there to catch.
CROSSINGS = {
    "pure-methods": ("expertmerge.methods.base", "expertmerge.io.reader"),
    "pure-maths": ("expertmerge.losses", "expertmerge.pool"),
    "library-layers": ("expertmerge.methods.registry", "expertmerge.merge_config.parse"),
    "top-layers": ("calib_data.tasks", "lightning_modules.merging"),
    "core-without-data": ("expertmerge.teachers", "calib_data.tasks"),
    "library-without-lightning": ("expertmerge.fit.merged", "lightning_modules.merging"),
    "fit-without-data-module": ("expertmerge.fit.prepare", "calib_data.tasks"),
    "moe-below-symphony-and-data": ("expertmerge.moe.checkpoint", "expertmerge.symphony"),
    "no-package-cycles": ("expertmerge.io.reader", "expertmerge.pool"),
    "zoos-are-plugins": ("expertmerge.pool", "expertmerge_zoos.tiny"),
}


def _lint_imports() -> str | None:
    beside = Path(sys.executable).with_name("lint-imports")  # the venv's, when pytest runs from it
    return str(beside) if beside.exists() else shutil.which("lint-imports")


def test_lint_imports_passes_on_every_contract() -> None:
    executable = _lint_imports()
    if executable is None:
        pytest.skip("lint-imports is not installed (pip install -e '.[test]' brings import-linter)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [executable, "--no-cache", "--no-logo"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"Contracts: {len(CONFIG['contracts'])} kept, 0 broken." in done.stdout


def test_every_contract_has_a_crossing() -> None:
    assert {contract["id"] for contract in CONFIG["contracts"]} == set(CROSSINGS)


@pytest.mark.parametrize("contract_id", sorted(CROSSINGS))
def test_contract_breaks_on_an_import_across_it(contract_id: str) -> None:
    grimp = pytest.importorskip("grimp", reason="import-linter is not installed")
    # importlinter.api sets up import-linter's settings (a contract's timer among them) as lint-imports does.
    pytest.importorskip("importlinter.api", reason="import-linter is not installed")
    from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
    from importlinter.contracts.forbidden import ForbiddenContract
    from importlinter.contracts.layers import LayersContract

    kinds: dict[str, Any] = {
        "forbidden": ForbiddenContract,
        "layers": LayersContract,
        "acyclic_siblings": AcyclicSiblingsContract,
    }
    spec = next(c for c in CONFIG["contracts"] if c["id"] == contract_id)
    options = {k: v for k, v in spec.items() if k not in ("id", "name", "type")}
    session = {k: v for k, v in CONFIG.items() if k != "contracts"}

    def kept(crossing: tuple[str, str] | None) -> bool:
        sys.path.insert(0, str(REPO))  # this tree's packages, not an installed copy's
        try:
            graph = grimp.build_graph(
                *CONFIG["root_packages"], include_external_packages=True, cache_dir=None
            )
        finally:
            sys.path.remove(str(REPO))
        if crossing is not None:
            graph.add_import(importer=crossing[0], imported=crossing[1])
        contract = kinds[spec["type"]](name=spec["name"], session_options=session, contract_options=options)
        return contract.check(graph, verbose=False).kept

    assert kept(None)
    assert not kept(CROSSINGS[contract_id])


def test_the_pool_base_is_the_task_base_teacher() -> None:
    # expertmerge.teachers reads the base teacher's name from the pool, not from calib_data (a layer above).
    from calib_data.tasks import BASE_TEACHER
    from expertmerge.pool import BASE

    assert BASE == BASE_TEACHER == "base"
