"""Disjoint train / calib / heldout splits of text records, checked by text and by the tokens a model sees.

Held-out data that overlaps training or calibration data would flatter every merge; the zoos and the
quality benchmark check it here, by a hash of the text and (`token_key`) of the truncated token sequence.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from expertmerge.errors import ExpertMergeError


def text_key(text: str) -> str:
    """What two samples are compared by: a hash of the text with surrounding whitespace removed."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def check_disjoint(
    splits: Mapping[str, Sequence[Any]], key: Callable[[Any], str] = text_key, what: str = "splits"
) -> None:
    """Raise an ExpertMergeError when any two splits share a sample (compared by `key`)."""
    keys = {name: {key(item) for item in items} for name, items in splits.items()}
    overlaps = []
    names = list(keys)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = keys[first] & keys[second]
            if shared:
                overlaps.append(f"{first}/{second}: {len(shared)}")
    if overlaps:
        raise ExpertMergeError(
            f"{what} overlap ({', '.join(overlaps)} shared samples); they must be disjoint."
        )


def token_key(tokenizer: Any, max_length: int) -> Callable[[str], str]:
    """A `check_disjoint` key on the truncated token sequence: what the model actually sees of a text."""

    def key(text: str) -> str:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        return hashlib.sha256(json.dumps(ids).encode()).hexdigest()

    return key


def split_records(
    records: Sequence[dict[str, Any]],
    seed: int,
    sizes: Mapping[str, int],
    key: Callable[[str], str] = text_key,
    per_group: Mapping[str, int] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Seeded disjoint splits: duplicates (by `key`) dropped, then heldout, calib and train filled in turn.

    Records with the same `group` field (e.g. one problem template with the same numbers, only other names)
    always land in the same split, so no split holds a mere rewording of another split's sample; what a
    full split cannot take of a group is dropped. `per_group` caps how many texts a split takes of one group
    (e.g. `{"heldout": 2}`: a held-out set of 48 texts then comes from at least 24 sources, not from the one
    big file that happens to be drawn first); the rest of a capped group is dropped, not given to another
    split.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for record in records:
        k = key(record["text"])
        if k not in seen:
            seen.add(k)
            groups.setdefault(str(record.get("group", k)), []).append(record)
    order = sorted(groups)
    random.Random(f"{seed}:split").shuffle(order)
    splits: dict[str, list[dict[str, Any]]] = {"heldout": [], "calib": [], "train": []}
    names = iter(splits)
    current = next(names)
    for group in order:
        while len(splits[current]) >= sizes[current]:
            current = next(names, None)
            if current is None:
                break
        if current is None:
            break
        take = sizes[current] - len(splits[current])
        if per_group and per_group.get(current):
            take = min(take, per_group[current])
        splits[current] += groups[group][:take]
    if (
        len(splits["heldout"]) < sizes["heldout"]
        or len(splits["calib"]) < sizes["calib"]
        or not splits["train"]
    ):
        raise ExpertMergeError(
            f"only {len(seen)} distinct samples in {len(groups)} groups: too few for {dict(sizes)}."
        )
    check_disjoint({name: [r["text"] for r in rows] for name, rows in splits.items()}, key)
    grouped = {name: [r["group"] for r in rows if "group" in r] for name, rows in splits.items()}
    check_disjoint(grouped, key=str, what="sample groups of the splits")
    return splits


def calib_task(name: str, source: str, path: str | None = None) -> dict[str, Any]:
    """A fit config's `data.tasks` entry for a zoo task (expert = task name) calibrated on `source`; with
    `group_field: group` when the file's records carry their source group (`path`: the file, when `source`
    is a `zoo://` reference), so the fit's held-out calibration texts come from other sources."""
    task: dict[str, Any] = {"name": name, "expert": name, "sources": [source]}
    with open(path or source, encoding="utf-8") as handle:
        if "group" in json.loads(handle.readline()):
            task["group_field"] = "group"
    return task
