"""`python -m expertmerge fit`: a LightningCLI over the learned-merge (or sequence-MoE) module and the data.

The command runs its steps in order: the layer-wise fit (stage 1), for Expert Merging++ the chunk-wise fit
(stage 2, a fresh Trainer and optimiser over the chunk-wise coefficients, same module: nothing is loaded
twice), then on rank 0 the evaluation table, the exports and the summary.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

# Lightning messages that are noise for this command: warnings nobody running `fit` can act on ...
_QUIET_WARNINGS = (
    r".*tensorboardX.*",  # Lightning suggests TensorBoard when it falls back to its CSV logger; we want CSV
    r".*LightningCLI's args parameter is intended.*",  # argv is ours; sys.argv stays intact for DDP ranks
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # raised inside Lightning by newer torch
    r".*val_dataloader.* but have no `validation_step`.*",  # the sequence MoE is evaluated after the fit
    r".*module\(s\) in eval mode at the start of training.*",  # the frozen base runs in eval mode on purpose
)
# ... and info lines: the litlogger/litmodels tips and the device inventory (which repeats for stage 2).
_QUIET_INFO = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Seed set to",  # every fit seeds (seed_everything 0)
    "`Trainer.fit` stopped:",  # the progress bar already shows the last step of max_steps
)

# The loggers those lines come from: Lightning's rank-zero messages, and the seed ("Seed set to 0").
_QUIET_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.seed")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIET_INFO)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence the lines above for the duration of the command only (no process-wide filters)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    drop = _DropLines()
    with warnings.catch_warnings():
        for message in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def _config_files(args: Sequence[str]) -> list[str]:
    """The files given as `--config F` / `--config=F` (jsonargparse reads them in order, later ones win)."""
    files = []
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            files.append(args[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def _fit_cli(args: Sequence[str], run: bool = True):
    """The `fit` LightningCLI over `args` (`run=False`: parsed and instantiated, nothing run)."""
    from argparse import ArgumentError

    from expertmerge.cli.fit_cli import build_fit_cli
    from expertmerge.config_file import read_config_file
    from expertmerge.errors import ExpertMergeError

    # jsonargparse's own messages for a binary, malformed, empty or non-mapping file name no file (or raise).
    configs = {path: read_config_file(path, "--config") for path in _config_files(args)}
    try:
        return build_fit_cli(args, run)
    except ArgumentError as error:
        message = _unknown_key_message(" ".join(str(error).split()), configs)
        if message is None:
            raise
        raise ExpertMergeError(message) from error


def _unknown_key_message(message: str, configs: dict[str, Any]) -> str | None:
    """jsonargparse's report of a key the model class does not take, buried in a failed Union of classes, as
    one line: the key, where it was written (which --config file, or the command line), the closest valid key."""
    import difflib
    import importlib
    import inspect
    import re

    found = re.search(
        r'Parser key "([\w.]+)": Does not validate against any of the Union subtypes.*?'
        r"Problem with given class_path '([\w.]+)': Option '([\w.]+)' is not accepted",
        message,
    )
    if not found:
        return None
    group, class_path, option = found[1], found[2], found[3]
    module_name, _, class_name = class_path.rpartition(".")
    try:
        init = getattr(importlib.import_module(module_name), class_name).__init__
        valid = [
            name
            for name, p in inspect.signature(init).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    except (ImportError, AttributeError, TypeError, ValueError):
        valid = []
    where = "on the command line"
    for path, data in reversed(configs.items()):  # the last file that sets it is the one that counts
        block = data.get(group) if isinstance(data, dict) else None
        if isinstance(block, dict) and (option in block or option in (block.get("init_args") or {})):
            where = f"in '{path}'"
            break
    close = difflib.get_close_matches(option, valid, n=1)
    hint = (
        f'did you mean "{group}.{close[0]}"?' if close else f"`--{group}.help {class_name}` lists its keys."
    )
    return f'unknown key "{group}.{option}" {where} ({class_name} takes no `{option}`); {hint}'


def fit_main(argv: Sequence[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):  # ours: the merge's options; Lightning's on --help-all
        from expertmerge.cli.fit_help import fit_help

        print(fit_help())
        return 0
    argv = ["--help" if arg == "--help-all" else arg for arg in argv]
    with quiet_lightning():
        _fit_cli(["fit", *argv])
    return 0


def read_fit_config(config: str, overrides: Sequence[str] = ()) -> Any:
    """A fit config, parsed and checked, nothing run: `.model` (the Lightning module, not prepared),
    `.datamodule`, `.config` (the parsed namespace) and `.instantiate_trainer(**settings)` (a Trainer of the
    config's settings)."""
    with quiet_lightning():
        return _fit_cli(["--config", config, *overrides], run=False)
