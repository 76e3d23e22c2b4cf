"""From rows to token ids: the tokenizer, one row's text (a column, a template or a chat conversation), a
task's distinct token sequences in its shuffled order, and right padding with a mask.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from calib_data.sources import load_source, looks_like_hub_id, resolve_task_sources
from calib_data.tasks import (
    MESSAGES_COLUMN,
    TaskSpec,
    check_columns,
    group_column,
    needed_columns,
    reference_columns,
    scored,
)
from expertmerge.errors import ExpertMergeError
from expertmerge.hub import bounded_hub_call
from expertmerge.zoo_registry import resolve_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_TOKENIZE_CHUNK = 256


class TokenizedSamples(NamedTuple):
    input_ids: torch.Tensor  # [n, L] long, right-padded with the pad id
    attention_mask: torch.Tensor  # [n, L] long, 1 on real tokens
    # [n, L] long, 1 on the tokens of an expert-written answer (`answers: expert`); None: no answers
    answer_mask: torch.Tensor | None = None


class HeldOutRecord(NamedTuple):
    """What accuracy by generation needs of one sample of a scored task (`answer_field` / `tests_field`)."""

    prompt: str  # the text to continue: the sample's text, a chat rendered up to the assistant's turn
    answer: str | None  # the reference answer (`answer_field`)
    tests: str | None  # unit tests for pass@1 (`tests_field`)


def check_tokenizer_path(reference: str) -> str:
    """The local path of a tokenizer reference; a missing local folder is refused before any work.

    `fit` links `data.tokenizer` from the model's folder, so a missing folder is reported as a missing model
    (what the user wrote), not as a tokenizer that cannot be loaded.
    """
    path = resolve_path(reference)
    if not os.path.exists(path) and not looks_like_hub_id(path):
        looked = "" if os.path.abspath(path) == reference else f" (looked for {os.path.abspath(path)})"
        raise ExpertMergeError(
            f"The model folder '{reference}' does not exist{looked}. It is `model.base` (a sequence MoE's "
            "first expert), which `fit` also reads the tokenizer from (`data.tokenizer`); fix that path."
        )
    return path


def load_tokenizer(reference: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of a folder, hub id or `zoo://` reference, with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    if reference is None:
        raise ExpertMergeError(
            "No tokenizer: set `data.tokenizer` to the base model's folder (the fit command links it "
            "from `model.base`)."
        )
    path = check_tokenizer_path(reference)
    try:
        if os.path.exists(path):
            tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            tokenizer = bounded_hub_call(
                lambda: AutoTokenizer.from_pretrained(path), "`data.tokenizer` (`model.base`)", path
            )
    except (OSError, ValueError) as error:
        if not os.path.exists(path):
            raise ExpertMergeError(
                f"'{reference}' (`model.base`, used as `data.tokenizer`) is not a local folder (looked for "
                f"{os.path.abspath(path)}) and could not be loaded as a hub model: {error}"
            ) from error
        raise ExpertMergeError(
            f"Cannot load the tokenizer '{reference}' (`data.tokenizer`): {error}"
        ) from error
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ExpertMergeError(
                f"The tokenizer '{reference}' (`data.tokenizer`) has neither a pad nor an eos "
                "token, so samples cannot be padded; add a pad token to it."
            )
        # Padded positions are masked out everywhere, so which id fills them does not matter.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def row_text(
    task: TaskSpec,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    row: dict[str, Any],
    where: str,
    from_txt: bool = False,
) -> str | None:
    """The sample text of one row, or None when the row holds no usable text."""
    if from_txt and isinstance(row.get("text"), str):
        # A paragraph or document of a .txt file ends with the line break(s) that closed it.
        row = {**row, "text": row["text"].strip("\r\n")}
    if task.chat_template and row.get(MESSAGES_COLUMN) is not None:
        messages = row[MESSAGES_COLUMN]
        if not messages:
            return None
        if task.answers != "expert":
            return tokenizer.apply_chat_template(messages, tokenize=False)
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            raise ExpertMergeError(
                f"Task '{task.name}': a conversation in the `{MESSAGES_COLUMN}` column of {where} ends with an "
                f"assistant turn, but `data.tasks[{index}].answers: expert` asks the expert to write that turn; "
                "drop the assistant turns or set `answers: none`."
            )
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if task.template:
        values = {k: ("" if v is None else v) for k, v in row.items()}
        try:
            text = task.template.format_map(values)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise ExpertMergeError(
                f"Task '{task.name}': `data.tasks[{index}].template` fails on a row of {where}: "
                f"{type(error).__name__}: {error}"
            ) from error
    else:
        value = row.get(task.text_field)
        if isinstance(value, (list, dict)):
            raise ExpertMergeError(
                f"Task '{task.name}': column '{task.text_field}' (`data.tasks[{index}].text_field`) of "
                f"{where} holds {type(value).__name__}s, not text. Name a text column, or set "
                "`chat_template: true` for a chat-format `messages` column."
            )
        text = "" if value is None else str(value)
    if not text.strip():
        return None
    if not task.chat_template:
        return text
    messages = [{"role": "user", "content": text}]
    reply = row.get(task.response_field) if task.response_field is not None else None
    if reply is not None and str(reply).strip():
        messages.append({"role": "assistant", "content": str(reply)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=len(messages) == 1)


def _prompt_text(
    task: TaskSpec, index: int, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], where: str, text: str
) -> str:
    """The prompt a model answers for a scored row: its text without the assistant's reply in a chat."""
    if not task.chat_template:
        return text
    messages = row.get(MESSAGES_COLUMN)
    if messages:
        turns = list(messages)
        while turns and turns[-1].get("role") == "assistant":
            turns.pop()
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if task.response_field is None:
        return text  # already rendered up to the generation prompt
    return row_text(replace(task, response_field=None), index, tokenizer, row, where) or text


def _held_out_record(
    task: TaskSpec, index: int, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], where: str, text: str
) -> HeldOutRecord:
    def value(key: str) -> str | None:
        column = getattr(task, key)
        if not column:
            return None
        found = row.get(column)
        if found is None or not str(found).strip():
            raise ExpertMergeError(
                f"Task '{task.name}': a row of {where} has no value in column '{column}' "
                f"(`data.tasks[{index}].{key}`); every record of a task scored by generation needs one."
            )
        return str(found)

    return HeldOutRecord(
        _prompt_text(task, index, tokenizer, row, where, text), value("answer_field"), value("tests_field")
    )


BALANCE_POOL = 4  # `group_balance`: the training part is drawn from at least this many times the texts wanted


class _TaskRows(NamedTuple):
    """A task's sources as one list of rows: each part's used columns, where it came from, and its bounds."""

    parts: list[Any]
    wheres: list[str]
    from_txt: list[bool]
    bounds: list[int]  # part p holds the flat rows bounds[p] .. bounds[p + 1] - 1
    described: list[str]  # the files read


def _task_rows(task: TaskSpec, index: int) -> _TaskRows:
    needed, _ = needed_columns(task, index)
    needed = [*needed, *group_column(task), *reference_columns(task)]
    parts = []
    wheres = []
    from_txt = []
    described: list[str] = []
    for source in resolve_task_sources(task, index):
        described.extend(source.files if source.kind == "files" else [source.path])
        for dataset, is_txt in load_source(task, index, source):
            where = f"'{source.given}'"
            check_columns(task, index, where, dataset.column_names)
            # Reading only the used columns keeps row access cheap next to wide or binary columns.
            used = [c for c in dataset.column_names if c in needed or c == MESSAGES_COLUMN]
            parts.append(dataset.select_columns(used))
            wheres.append(where)
            from_txt.append(is_txt)
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + len(part))
    return _TaskRows(parts, wheres, from_txt, bounds, described)


def _shuffled_order(task: TaskSpec, seed: int, count: int) -> list[int]:
    # The shuffle is seeded per task by a stable hash of its name, so adding a task leaves the others be.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(task.name.encode())) % 2**63)
    return torch.randperm(count, generator=generator).tolist()


def _next_texts(
    task: TaskSpec,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    rows: _TaskRows,
    order: list[int],
    position: int,
    seen_texts: set[str],
) -> tuple[list[str], list[str], list[HeldOutRecord], int]:
    """The next chunk of new texts in shuffled order, their groups (with `group_field`), their records (for a
    task scored by generation), and the next position."""
    texts = []
    text_groups = []
    records = []
    parts, bounds = rows.parts, rows.bounds
    while position < len(order) and len(texts) < _TOKENIZE_CHUNK:
        flat = order[position]
        position += 1
        part = next(p for p in range(len(parts)) if flat < bounds[p + 1])
        row = parts[part][flat - bounds[part]]
        text = row_text(task, index, tokenizer, row, rows.wheres[part], rows.from_txt[part])
        if text is not None and text not in seen_texts:
            seen_texts.add(text)
            texts.append(text)
            if task.group_field:
                text_groups.append(str(row[task.group_field]))
            if scored(task):
                records.append(_held_out_record(task, index, tokenizer, row, rows.wheres[part], text))
    return texts, text_groups, records, position


def task_tokens(
    task: TaskSpec,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    wanted: int,
    max_length: int,
    tokenizer_name: str | None = None,
    eval_wanted: int = 0,
    balanced: bool = False,
    records: dict[tuple[int, ...], HeldOutRecord] | None = None,
) -> tuple[list[list[int]], list[str], list[str] | None]:
    """Up to `wanted` usable, distinct token sequences of a task in shuffled order, the files read, and each
    sequence's group (`group_field`; None without one). With groups, reading goes on until `group_roles`
    can fill `eval_wanted` held-out and `wanted - eval_wanted` training samples from groups kept apart.
    `records`, for a task scored by generation, receives each kept sequence's record (keyed by its ids)."""
    if task.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ExpertMergeError(
            f"Task '{task.name}' sets `data.tasks[{index}].chat_template: true`, but the tokenizer "
            f"'{tokenizer_name}' has no chat template; set it to false or use a chat tokenizer."
        )
    rows = _task_rows(task, index)
    order = _shuffled_order(task, seed, rows.bounds[-1])
    # Chat-rendered text already holds the template's special tokens (BOS included).
    add_special_tokens = not task.chat_template
    special_ids = set(tokenizer.all_special_ids)
    seen_texts: set[str] = set()
    seen_tokens: set[tuple[int, ...]] = set()
    kept: list[list[int]] = []
    groups: list[str] = []
    grouped = bool(task.group_field)
    from calib_data.groups import group_roles

    def enough() -> bool:
        if not grouped:
            return len(kept) >= wanted
        roles = group_roles(groups, eval_wanted, wanted - eval_wanted, balanced)
        full = roles.count("eval") >= eval_wanted and roles.count("train") >= wanted - eval_wanted
        return full and (not balanced or len(kept) >= BALANCE_POOL * wanted)

    position = 0
    while position < len(order) and not enough():
        texts, text_groups, text_records, position = _next_texts(
            task, index, tokenizer, rows, order, position, seen_texts
        )
        if not texts:
            continue
        encoded = tokenizer(
            texts, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length
        )
        for row, ids in enumerate(encoded["input_ids"]):
            key = tuple(ids)
            # Counted after truncation; the settings check keeps min_tokens <= max_length.
            content = sum(1 for token in ids if token not in special_ids)
            # Texts that share their first max_length tokens are the same sample once truncated.
            if content >= task.min_tokens and key not in seen_tokens and (grouped or len(kept) < wanted):
                seen_tokens.add(key)
                kept.append(list(ids))
                if grouped:
                    groups.append(text_groups[row])
                if records is not None and text_records:
                    records[key] = text_records[row]
    return kept, rows.described, groups if grouped else None


def pad(sequences: Sequence[Sequence[int]], pad_id: int) -> TokenizedSamples:
    """Right-pad token sequences to the longest one; the mask is 1 on real tokens."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return TokenizedSamples(input_ids, attention_mask)


def join_answers(
    prompts: TokenizedSamples, answers: Sequence[Sequence[int]], max_length: int, pad_id: int
) -> tuple[TokenizedSamples, int]:
    """Each prompt followed by its answer's tokens, cut to `max_length` and right-padded, with the answer's
    tokens marked in `answer_mask`; and how many answers the cut shortened.

    The answer's token ids are appended as the expert wrote them: decoding and tokenizing prompt + answer
    again could split the seam differently and teach the merge tokens the expert never produced.
    """
    lengths = prompts.attention_mask.sum(dim=1).tolist()
    if len(answers) != len(lengths):
        raise ValueError(f"{len(answers)} answers for {len(lengths)} prompts")
    joined: list[list[int]] = []
    starts: list[int] = []
    shortened = 0
    for row, (length, answer) in enumerate(zip(lengths, answers, strict=True)):
        ids = prompts.input_ids[row, : int(length)].tolist() + list(answer)
        shortened += len(ids) > max_length
        joined.append(ids[:max_length])
        starts.append(int(length))
    samples = pad(joined, pad_id)
    positions = torch.arange(samples.input_ids.shape[1]).unsqueeze(0)
    answer_mask = (positions >= torch.tensor(starts).unsqueeze(1)).long() * samples.attention_mask
    return TokenizedSamples(samples.input_ids, samples.attention_mask, answer_mask), shortened
