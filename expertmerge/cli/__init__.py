"""`python -m expertmerge <command>`: fit / merge / evaluate / export / zoo, one thin module per command.

`fit` is a LightningCLI (`--config`, `--model.*`, `--data.*`, `--trainer.*`, `--print_config`); the other
commands are small argparse programs over the same library.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console

from expertmerge.errors import ExpertMergeError

USAGE = """usage: python -m expertmerge <command> [options]

commands:
  fit        learn merge coefficients on calibration data (Expert Merging), export the merged model
  merge      training-free merge (average, task_arithmetic, ties, dare_linear, dare_ties) from a mergekit-style YAML
  evaluate   score model folders against the experts on the held-out calibration samples of a fit config
  export     write the merged model of a saved fit checkpoint
  zoo        build (or locate) a registered demo zoo of a base model and experts (tiny, smollm2)

`python -m expertmerge <command> --help` describes each command's options.
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    console = Console(stderr=True)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own rich progress bars cover the long steps
    try:
        if command == "fit":
            from expertmerge.cli.fit import fit_main

            return fit_main(rest)
        if command == "merge":
            from expertmerge.cli.merge import merge_main

            return merge_main(rest)
        if command == "zoo":
            from expertmerge.cli.zoo import zoo_main

            return zoo_main(rest)
        if command == "evaluate":
            from expertmerge.cli.evaluate import evaluate_main

            return evaluate_main(rest)
        if command == "export":
            from expertmerge.cli.export import export_main

            return export_main(rest)
    except Exception as error:
        # Our errors can arrive wrapped (jsonargparse re-raises what a module's __init__ raised as a ValueError).
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, ExpertMergeError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        console.print(f"[bold red]error:[/bold red] {cause}")
        return 2
    console.print(f"[bold red]error:[/bold red] unknown command '{command}'.\n{USAGE}")
    return 2
