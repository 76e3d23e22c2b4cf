"""Where a task's text comes from: resolving sources (paths, globs, `corpora://`, `zoo://`, saved folders, hub
ids), a cheap look at each file's first rows (empty? valid JSON? which columns?), and loading with `datasets`.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from calib_data.tasks import TaskSpec, describe_columns
from expertmerge.config_file import check_regular_file
from expertmerge.errors import ExpertMergeError
from expertmerge.hub import bounded_hub_call, folder_bytes, hub_cache_size
from expertmerge.zoo_registry import resolve_path

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
CORPORA_SCHEME = "corpora://"

# file suffix -> `datasets` packaged builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
# Suffixes of files we cannot read: a missing "notes.tsv" is a wrong path, not a hub dataset id.
_OTHER_FILE_SUFFIXES = {
    ".tsv", ".xlsx", ".xls", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".md", ".html", ".xml",
    ".yaml", ".yml", ".pdf", ".doc", ".docx", ".py", ".jsonlines", ".ndjson",
}  # fmt: skip
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# JSON Lines rows parsed by the up-front check: enough to catch a wrong format, cheap on any file.
_PEEK_ROWS = 10_000


@dataclass
class Source:
    """One resolved source: what the user wrote, and how to read it."""

    given: str
    kind: Literal["files", "saved", "hub"]
    files: list[str] = field(default_factory=list)  # for kind == "files"
    path: str = ""  # for kind == "saved" (folder) or "hub" (dataset id)


def _sources_key(index: int) -> str:
    return f"data.tasks[{index}].sources"


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def looks_like_hub_id(reference: str) -> bool:
    """`owner/name` or `name` with no file suffix and no path-like prefix: a hub id."""
    if reference.startswith((".", "/", "~", "\\")) or "\\" in reference:
        return False
    if Path(reference).suffix.lower() in BUILDERS.keys() | _OTHER_FILE_SUFFIXES:
        return False
    return reference.count("/") <= 1 and reference.strip() != ""


def resolve_source(reference: str) -> str:
    """A source as a local path: `corpora://<file>` to the shipped corpora folder, `zoo://` via the zoo.

    Anything else (a path relative to the current directory, an absolute path, a hub id) is unchanged.
    """
    if reference.startswith(CORPORA_SCHEME):
        return str(CORPORA_DIR / reference[len(CORPORA_SCHEME) :])
    return resolve_path(reference)


def _check_suffix(task: TaskSpec, index: int, given: str, path: str) -> None:
    if Path(path).suffix.lower() not in BUILDERS:
        raise ExpertMergeError(
            f"Task '{task.name}': '{path}' (from '{given}' in `{_sources_key(index)}`) has an unsupported "
            f"type; use one of {', '.join(sorted(BUILDERS))}, or a `datasets.save_to_disk` folder."
        )


def resolve_task_sources(task: TaskSpec, index: int) -> list[Source]:
    """Every source of a task as files / a saved folder / a hub id; raises when a local one is missing."""
    key = _sources_key(index)
    if not task.sources:
        raise ExpertMergeError(f"Task '{task.name}' has no sources: list its data files under `{key}`.")
    resolved = []
    for given in task.sources:
        reference = resolve_source(given)
        if _is_glob(reference):
            matches = sorted(
                os.path.abspath(m) for m in glob.glob(reference, recursive=True) if os.path.isfile(m)
            )
            if not matches:
                raise ExpertMergeError(
                    f"Task '{task.name}': the glob '{given}' in `{key}` matches no file "
                    f"(looked from {os.getcwd()}). Fix the pattern or the working directory."
                )
            for match in matches:
                _check_suffix(task, index, given, match)
            resolved.append(Source(given, "files", files=matches))
            continue
        path = os.path.abspath(reference)
        if os.path.isdir(path):
            if not any(os.path.exists(os.path.join(path, m)) for m in _SAVED_DATASET_MARKERS):
                raise ExpertMergeError(
                    f"Task '{task.name}': '{given}' in `{key}` is a folder but not a "
                    "`datasets.save_to_disk` folder; give its files instead, e.g. "
                    f"'{os.path.join(given, '*.jsonl')}'."
                )
            resolved.append(Source(given, "saved", path=path))
        elif os.path.isfile(path):
            _check_suffix(task, index, given, path)
            resolved.append(Source(given, "files", files=[path]))
        elif os.path.exists(path):  # a device such as /dev/zero, a named pipe: reading it would never end
            check_regular_file(path, f"Task '{task.name}': `{key}` entry")
        elif looks_like_hub_id(reference):
            resolved.append(Source(given, "hub", path=reference))
        elif given.startswith(CORPORA_SCHEME):
            shipped = sorted(p.name for p in CORPORA_DIR.glob("*.jsonl"))
            raise ExpertMergeError(
                f"Task '{task.name}': '{given}' in `{key}` is not a shipped corpus (looked for {path}); "
                f"the shipped corpora are: {', '.join(CORPORA_SCHEME + name for name in shipped)}."
            )
        else:
            raise ExpertMergeError(
                f"Task '{task.name}': file '{given}' in `{key}` does not exist (looked for {path}). "
                "Fix the path or run from the folder it is relative to."
            )
    return resolved


# ------------------------------------------------------------------------------------ a look at the first rows
class _BadFile(Exception):
    """What is wrong with a data file, phrased to follow "file '<path>' ..."."""


def _record_columns(records: list[Any], what: str) -> list[str]:
    """Columns of a list of JSON records (the union over the first rows, in first-seen order)."""
    columns: dict[str, None] = {}
    for number, record in enumerate(records[:_PEEK_ROWS]):
        if not isinstance(record, dict):
            raise _BadFile(
                f"holds a JSON {type(record).__name__} as {what} {number + 1}, not an object of columns "
                '(e.g. {"text": "..."})'
            )
        columns.update(dict.fromkeys(record))
    return list(columns)


def _json_columns(path: str) -> list[str]:
    """Columns of a JSON Lines file, or of a JSON document (an array of records or an object of columns).

    `datasets` reads both kinds whatever the suffix, so both are accepted; the first rows are parsed, and a
    file that parses as neither is reported with the line that breaks it.
    """
    rows: list[Any] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                if rows:  # JSON Lines up to here: this line is the broken one
                    raise _BadFile(f"is not valid JSON Lines: line {number}: {error.msg}") from error
                break  # maybe a JSON document spread over several lines
            if not isinstance(row, dict):
                if rows:
                    raise _BadFile(
                        f"is not valid JSON Lines: line {number} holds a JSON {type(row).__name__}, not an "
                        'object of columns (e.g. {"text": "..."})'
                    )
                break
            rows.append(row)
            if len(rows) >= _PEEK_ROWS:
                break
        else:
            if not rows:
                raise _BadFile("is empty: it holds no rows")
        if rows:
            return _record_columns(rows, "row")
        handle.seek(0)
        try:
            document = json.load(handle)
        except json.JSONDecodeError as error:
            raise _BadFile(
                f"is not valid JSON or JSON Lines: line {error.lineno} column {error.colno}: {error.msg}"
            ) from error
    if isinstance(document, list):
        if not document:
            raise _BadFile("is empty: it holds an empty JSON array")
        return _record_columns(document, "record")
    if isinstance(document, dict):
        if not document:
            raise _BadFile("is empty: it holds an empty JSON object")
        return list(document)
    raise _BadFile(f"holds a single JSON {type(document).__name__}, not rows of columns")


def _csv_columns(path: str) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = (row for row in csv.reader(handle) if any(cell.strip() for cell in row))
        header = next(rows, None)
        if header is None:
            raise _BadFile("is empty: it has no header row")
        count = 0
        for count, row in enumerate(itertools.islice(rows, _PEEK_ROWS), 1):
            if len(row) > len(header):  # the CSV reader of `datasets` refuses it too, only later
                raise _BadFile(
                    f"is not valid CSV: row {count + 1} has {len(row)} fields but the header row has "
                    f"{len(header)}"
                )
        if count == 0:
            raise _BadFile(f"has a header ({describe_columns(header)}) but no rows")
    return header


def _parquet_columns(path: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
        names = list(pq.read_schema(path).names)
    except (pa.ArrowException, OSError) as error:
        raise _BadFile(f"is not a valid Parquet file: {error}") from error
    if metadata.num_rows == 0:
        raise _BadFile(f"is empty: it has columns ({describe_columns(names)}) but no rows")
    return names


def _txt_columns(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        while chunk := handle.read(1 << 16):  # a huge file is read only up to its first text
            if chunk.strip():
                return ["text"]
    raise _BadFile("is empty: it holds no text")


def peek_columns(task: TaskSpec, index: int, path: str) -> list[str]:
    """Column names of a data file from its first rows (or its schema); refuses empty or unparsable files."""
    suffix = Path(path).suffix.lower()
    readers = {".txt": _txt_columns, ".parquet": _parquet_columns, ".csv": _csv_columns}
    try:
        return readers.get(suffix, _json_columns)(path)
    except _BadFile as problem:
        raise ExpertMergeError(
            f"Task '{task.name}': file '{path}' (`{_sources_key(index)}`) {problem}. Fix the file or remove "
            "it from the sources."
        ) from problem
    except UnicodeDecodeError as error:
        raise ExpertMergeError(
            f"Task '{task.name}': file '{path}' (`{_sources_key(index)}`) is not UTF-8 text "
            f"(byte {error.start}); save it as UTF-8."
        ) from error
    except OSError as error:
        raise ExpertMergeError(
            f"Task '{task.name}': cannot read '{path}' (`{_sources_key(index)}`): {error}"
        ) from error


# ------------------------------------------------------------------------------------ loading
def _root_message(error: BaseException) -> str:
    """The message at the end of the `raise ... from` chain: `datasets` wraps the parser's useful one in a
    generic error (implicit contexts are not followed: they hold the fallback parsers' own failures)."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return f"{type(error).__name__}: {error}"


def load_saved(task: TaskSpec, index: int, source: Source) -> Any:
    """A `datasets.save_to_disk` folder as one Dataset (the task's split of a saved DatasetDict)."""
    import datasets

    loaded = datasets.load_from_disk(source.path)
    if isinstance(loaded, datasets.DatasetDict):
        if task.split not in loaded:
            raise ExpertMergeError(
                f"Task '{task.name}': dataset folder '{source.path}' has no split '{task.split}' "
                f"(`data.tasks[{index}].split`); its splits are: {', '.join(loaded)}."
            )
        loaded = loaded[task.split]
    return loaded


@contextmanager
def _no_datasets_bars() -> Iterator[None]:
    """datasets' own bars ("Generating train split", "Loading dataset from disk") off while a source loads,
    whoever set the datamodule up; the caller's setting is restored."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def load_source(task: TaskSpec, index: int, source: Source) -> list[tuple[Any, bool]]:
    """The `datasets.Dataset`s of one source (one per file type of a glob), each with whether it was
    cut from .txt files (whose samples keep the line break that ended them)."""
    with _no_datasets_bars():
        return _load_source(task, index, source)


def _hub_dataset_bytes(repo_id: str) -> int:
    """Bytes downloaded for a hub dataset plus the Arrow files `datasets` writes from them: converting a large
    download takes minutes without a byte from the network, and that is progress too."""
    import datasets

    arrow = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return hub_cache_size(repo_id, "dataset") + folder_bytes(arrow)


def _load_source(task: TaskSpec, index: int, source: Source) -> list[tuple[Any, bool]]:
    import datasets

    key = _sources_key(index)
    if source.kind == "saved":
        return [(load_saved(task, index, source), False)]
    if source.kind == "hub":
        try:
            loaded_hub = bounded_hub_call(
                lambda: datasets.load_dataset(source.path, split=task.split),
                f"Task '{task.name}' (`{key}`)",
                source.path,
                "dataset",
                lambda: _hub_dataset_bytes(source.path),
            )
            return [(loaded_hub, False)]
        except ExpertMergeError:
            raise
        except Exception as error:  # the hub client raises many types (offline, gated, missing)
            raise ExpertMergeError(
                f"Task '{task.name}': could not load '{source.given}' (`{key}`) as a "
                f"local file or a hub dataset: {type(error).__name__}: {error}. If it is a file, fix the "
                "path; if it is a hub dataset and this machine is offline, download it elsewhere and "
                "give the saved folder or files instead."
            ) from error
    by_builder: dict[str, list[str]] = {}
    for path in source.files:
        by_builder.setdefault(BUILDERS[Path(path).suffix.lower()], []).append(path)
    loaded = []
    for builder, files in by_builder.items():
        options: dict[str, Any] = {}
        if builder == "text":
            # Inside a paragraph or document the line breaks are part of the text.
            options = {"sample_by": task.txt_sample_by, "keep_linebreaks": task.txt_sample_by != "line"}
        try:
            dataset = datasets.load_dataset(builder, data_files=files, split="train", **options)
        except Exception as error:  # parse errors surface as several exception types
            raise ExpertMergeError(
                f"Task '{task.name}': cannot read {', '.join(files)} (`{key}`): {_root_message(error)}"
            ) from error
        loaded.append((dataset, builder == "text"))
    return loaded
