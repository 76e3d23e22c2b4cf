"""The records of a tiny-zoo task, read from the jsonl beside this file.

lm-evaluation-harness hands `dataset_kwargs.data_files` to `datasets.load_dataset` as given, so a relative path
there is read from the working directory; loading through this function finds the files from any directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets


def load(file: str, **_: Any) -> datasets.DatasetDict:
    """`file`'s records as the `test` split (lm-eval also passes its metadata, which is not needed here)."""
    lines = (Path(__file__).parent / file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
