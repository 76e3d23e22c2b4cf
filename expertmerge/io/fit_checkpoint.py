"""Reading `fit` checkpoints (.ckpt) as plain data, and checking that they belong to the models at hand.

A .ckpt file is a pickle: loaded with `weights_only=False`, a crafted one runs any code it names. Ours hold
only tensors and plain values (dicts, lists, strings, numbers), so they are always read with
`weights_only=True`, which refuses every other Python object before it is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from expertmerge.errors import ExpertMergeError

# Values of `fit --ckpt_path` that Lightning resolves itself (no file name); it loads them weights-only too.
LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc")
# The `expertmerge` section's key for the content hashes of the base and the experts the fit learned on.
MODEL_HASHES = "model_hashes"


def is_lightning_checkpoint_name(path: str) -> bool:
    return path in LIGHTNING_CHECKPOINT_NAMES or path.startswith("registry")


def refused_object(error: BaseException) -> str | None:
    """Why a `weights_only=True` load refused a file that holds Python objects (in one line), or None when
    the load failed for another reason (a broken or foreign file)."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(error))
    if refused is None:
        return None
    return f"it holds the Python object '{refused.group(1)}', which is not loaded: loading it could run code"


def load_fit_checkpoint(path: str | Path, label: str) -> dict[str, Any]:
    """The checkpoint at `path` as plain data, or one `ExpertMergeError` (starting with `label`, e.g.
    "export --ckpt_path") when it is missing, empty, not a Lightning checkpoint, or holds other objects."""
    import torch

    if "://" in str(path):
        raise ExpertMergeError(f"{label} '{path}' is a URL; download the .ckpt file and give its local path.")
    file = Path(path).expanduser()
    if not file.exists():
        raise ExpertMergeError(f"{label} '{path}' does not exist; give a .ckpt file written by `fit`.")
    if file.is_dir():
        raise ExpertMergeError(f"{label} '{path}' is a folder; give the .ckpt file inside it.")
    if file.stat().st_size == 0:
        raise ExpertMergeError(f"{label} '{path}' is empty (a fit killed while saving?); use another one.")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike: the file is not a checkpoint of ours
        reason = refused_object(error) or f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        raise ExpertMergeError(
            f"{label} '{path}' is not a checkpoint written by `fit` ({reason})."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ExpertMergeError(f"{label} '{path}' is not a Lightning checkpoint (it has no state_dict).")
    return checkpoint


def check_same_models(
    checkpoint: Mapping[str, Any],
    hashes: Mapping[str, str],
    folders: Mapping[str, Path],
    path: str,
    label: str,
) -> None:
    """Refuse a checkpoint learned on other weights than the models at hand, under the same names: its
    coefficients would be applied to task vectors they were not learned for. `hashes` and `folders` are keyed
    like `ExpertPool.content_hashes()` ("base" and the expert names). A checkpoint written before the hashes
    were stored has none: there is nothing to compare."""
    saved = (checkpoint.get("expertmerge") or {}).get(MODEL_HASHES) or {}
    for name, digest in hashes.items():
        if name in saved and saved[name] != digest:
            who = "the base model" if name == "base" else f"expert '{name}'"
            raise ExpertMergeError(
                f"{label}: the checkpoint '{path}' was learned on other weights of {who} than those in "
                f"'{folders[name]}'; use the models the checkpoint was made with (or fit again)."
            )
