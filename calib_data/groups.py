"""Held-out parts made of whole source groups: which sample goes to which side (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Split = Literal["train", "val", "eval"]


def group_roles(
    groups: Sequence[str], n_eval: int, n_train: int, balanced: bool = False
) -> list[Split | None]:
    """Per sample (in shuffled order, `groups[i]` its source group) "eval", "train" or None (unused), so that
    no group is on both sides. Read in order: a sample of a new group holds that group out while the held-out
    part has fewer than `n_eval` samples, and makes it a training group otherwise; held-out groups fill the
    held-out part up to `n_eval` samples, training groups the training part up to `n_train` (the rest is
    unused). A sample's role depends only on the samples before it, so the held-out part does not change with
    `n_train` (or with how far the texts are read)."""
    held: set[str] = set()
    training: set[str] = set()
    taken = {"eval": 0, "train": 0}
    roles: list[Split | None] = []
    for group in groups:
        if group not in held and group not in training:
            (held if taken["eval"] < n_eval else training).add(group)
        role: Split = "eval" if group in held else "train"
        if taken[role] < (n_eval if role == "eval" else n_train) and (role == "eval" or not balanced):
            taken[role] += 1
            roles.append(role)
        else:
            roles.append(None)
    if balanced:  # the training part in rounds over the training groups (first seen first): source variety
        members: dict[str, list[int]] = {}
        for position, group in enumerate(groups):
            if group in training:
                members.setdefault(group, []).append(position)
        depth = 0
        while taken["train"] < n_train and any(depth < len(rows) for rows in members.values()):
            for rows in members.values():
                if depth < len(rows) and taken["train"] < n_train:
                    roles[rows[depth]] = "train"
                    taken["train"] += 1
            depth += 1
    return roles
