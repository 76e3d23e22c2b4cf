"""`python -m expertmerge <command>`: fit / merge / evaluate / export / sweep / zoo, one thin module per command.

`fit` is a LightningCLI (`--config`, `--model.*`, `--data.*`, `--trainer.*`, `--print_config`); the other
commands are small argparse programs over the same library.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from rich.markup import escape

from expertmerge.console import make_console
from expertmerge.errors import ExpertMergeError

USAGE = """usage: python -m expertmerge <command> [options]

commands:
  fit        learn merge coefficients on calibration data (Expert Merging), export the merged model
  merge      training-free merge from a mergekit YAML, read unchanged (all 20 of mergekit's methods, slices, tokenizers)
  moe        fused MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) from a mergekit-moe YAML, read unchanged
  evaluate   score model folders against the experts on the held-out calibration samples of a fit config
  export     write the merged model of a saved fit checkpoint
  plan       per-device memory of a fit (resident, streamed, FSDP) from config.json alone: does it fit?
  sweep      fit once per weight of one task; plot each domain's gain and the general-text KL (tradeoff.png)
  zoo        build (or locate) a registered demo zoo of a base model and experts (tiny, smollm2)
  symphony   one MoE (or dense model) from experts pretrained apart, with no shared base (Symphony-MoE)

`python -m expertmerge <command> --help` describes each command's options.
"""


DEBUG_ENV = "EXPERTMERGE_DEBUG"


def _user_error(error: BaseException) -> str | None:
    """The one-line message of a user error (ours, or a bad argument or trainer setting); None for a bug."""
    import argparse

    from lightning_fabric.utilities.exceptions import MisconfigurationException

    # Ours can arrive wrapped (jsonargparse re-raises what a module's __init__ raised as a ValueError).
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ExpertMergeError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, argparse.ArgumentError):  # jsonargparse: a key's value has the wrong type
        return _innermost_key_error(" ".join(str(error).split()))
    if isinstance(error, MisconfigurationException):  # Lightning: an impossible trainer setting
        return "trainer: " + " ".join(str(error).split())
    return None


def _innermost_key_error(message: str) -> str:
    """jsonargparse reports a bad `--model.lr abc` of the (subclass-mode) model as a failed Union of classes;
    say what the user wrote instead: `Parser key "model.lr": Expected a <class 'float'>. Got value: abc`."""
    import re

    found = re.search(
        r'Parser key "([\w.]+)": Does not validate against any of the Union subtypes.*?'
        r"Problem with given class_path '[^']*': Parser key \"([\w.]+)\": (.*?)"
        r"(?: - Expected a <class 'NoneType'>.*)?$",
        message,
    )
    return f'Parser key "{found[1]}.{found[2]}": {found[3]}' if found else message


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user error is one line `error: ...` and exit code 2 (`--debug` as the first
    argument, or EXPERTMERGE_DEBUG=1, shows its traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    # soft_wrap: one line stays one line, whatever the terminal width
    console = make_console(stderr=True, soft_wrap=True)
    if command not in COMMANDS:
        console.print(
            f"[bold red]error:[/bold red] unknown command {escape(repr(command))}.\n{escape(USAGE)}"
        )
        return 2
    if not any(arg in ("-h", "--help") for arg in rest):  # a command's help loads no transformers (seconds)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # our own rich progress bars cover the long steps
    try:
        return _run(command, rest)
    except SystemExit as exit_:  # argparse has printed usage and its one error line already
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except KeyboardInterrupt as stop:  # Ctrl-C: an output being written has removed its temporary already
        if debug:
            raise
        console.print(f"[bold red]{escape(str(stop) or 'interrupted')}[/bold red]")
        return 130
    except Exception as error:
        message = None if debug else _user_error(error)
        if message is None:
            raise
        # The user's text is printed literally: a path such as `runs/[bold]v2` is not rich markup.
        console.print(f"[bold red]error:[/bold red] {escape(message)}")
        return 2


COMMANDS = ("fit", "merge", "moe", "symphony", "zoo", "evaluate", "export", "plan", "sweep")


def _run(command: str, rest: list[str]) -> int:
    if command == "fit":
        from expertmerge.cli.fit import fit_main

        return fit_main(rest)
    if command == "merge":
        from expertmerge.cli.merge import merge_main

        return merge_main(rest)
    if command == "moe":
        from expertmerge.cli.moe import moe_main

        return moe_main(rest)
    if command == "zoo":
        from expertmerge.cli.zoo import zoo_main

        return zoo_main(rest)
    if command == "symphony":
        from expertmerge.cli.symphony import symphony_main

        return symphony_main(rest)
    if command == "evaluate":
        from expertmerge.cli.evaluate import evaluate_main

        return evaluate_main(rest)
    if command == "plan":
        from expertmerge.cli.plan import plan_main

        return plan_main(rest)
    if command == "sweep":
        from expertmerge.cli.sweep import sweep_main

        return sweep_main(rest)
    from expertmerge.cli.export import export_main

    return export_main(rest)
