"""Where a model comes from: the local folder of a model source, checked to be a Hugging Face model folder.

Sources, per model:

- a local folder with `model.safetensors`, a sharded `model.safetensors.index.json`, or (only when no
  safetensors are there) `pytorch_model.bin` / `pytorch_model.bin.index.json`, read with `weights_only=True`;
- `zoo://<zoo>/<path>`: a registered model zoo (see `expertmerge.zoo_registry`);
- a hub id such as `org/name` that is not an existing path: downloaded with `huggingface_hub.snapshot_download`
  (config, tokenizer and weights only; a silent network is an error after `EXPERTMERGE_HUB_TIMEOUT`
  seconds without progress, see `expertmerge.hub`) and then read like a local folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from expertmerge.errors import ExpertMergeError
from expertmerge.hub import bounded_hub_call
from expertmerge.zoo_registry import resolve_path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.safetensors"]


def looks_like_hub_id(reference: str) -> bool:
    """`org/name` (no leading `.`, `/` or `~`, exactly one slash) and not an existing local path."""
    return bool(_HUB_ID.match(reference)) and not Path(reference).exists()


def _download(reference: str, label: str) -> Path:
    """Fetch a hub model's config, tokenizer and weights (safetensors, else `.bin`) into the HF cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:  # pragma: no cover - huggingface_hub comes with transformers
        raise ExpertMergeError(
            f"{label}: '{reference}' looks like a hub id but huggingface_hub is missing."
        ) from error

    def fetch(patterns: list[str]) -> Path:
        return Path(
            bounded_hub_call(lambda: snapshot_download(reference, allow_patterns=patterns), label, reference)
        )

    try:
        folder = fetch(_HUB_PATTERNS)
        if not any(folder.glob("*.safetensors")):
            folder = fetch([*_HUB_PATTERNS, "*.bin"])
    except ExpertMergeError:
        raise
    except Exception as error:  # network, auth, missing repo: all mean "cannot use this source"
        raise ExpertMergeError(
            f"{label}: '{reference}' is not a local folder and downloading it from the Hugging Face hub "
            f"failed ({type(error).__name__}: {error}). Give a local folder, or check the id and network."
        ) from error
    return folder


def model_dir(source: str, label: str) -> Path:
    """The local folder of a model source (a folder, a `zoo://` reference, or a hub id downloaded once),
    checked to be a Hugging Face model folder; errors name the model by `label`."""
    try:
        local = resolve_path(source)
    except ExpertMergeError:
        raise
    except Exception as error:
        raise ExpertMergeError(f"{label}: cannot resolve '{source}': {error}") from error
    folder = Path(local)
    if not folder.exists():
        if looks_like_hub_id(source):
            folder = _download(source, label)
        else:
            raise ExpertMergeError(f"{label}: folder '{folder}' does not exist.")
    if not folder.is_dir():
        raise ExpertMergeError(f"{label}: '{folder}' is not a folder.")
    if not (folder / "config.json").is_file():
        raise ExpertMergeError(f"{label}: '{folder}' has no config.json; is it a Hugging Face model folder?")
    return folder
