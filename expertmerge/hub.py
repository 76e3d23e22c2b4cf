"""Calls that may reach the Hugging Face hub, bounded in time.

huggingface_hub's HTTP client has no overall timeout: a network that accepts connections but never answers (a
captive portal, a dead proxy, a firewall that drops replies) leaves `snapshot_download` waiting forever. Every hub
call here runs in a daemon thread that the caller waits for; when nothing arrives for `hub_timeout()` seconds the
caller gets one error naming the id and the ways to work offline, and the abandoned thread dies with the process.
A download that is still receiving bytes is not cut: the wait restarts whenever `progress()` changes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from expertmerge.errors import ExpertMergeError

T = TypeVar("T")

HUB_TIMEOUT_ENV = "EXPERTMERGE_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 60.0
_POLL_SECONDS = 0.5


def hub_timeout() -> float:
    """Seconds a hub call may go without progress: `EXPERTMERGE_HUB_TIMEOUT`, else 60 s or huggingface_hub's own
    `HF_HUB_ETAG_TIMEOUT` / `HF_HUB_DOWNLOAD_TIMEOUT` where a user raised them above that (never cut them short)."""
    given = os.environ.get(HUB_TIMEOUT_ENV)
    if given is not None and given.strip():
        try:
            seconds = float(given)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ExpertMergeError(
                f"{HUB_TIMEOUT_ENV}='{given}' is not a positive number of seconds; unset it or give e.g. 60."
            )
        return seconds
    own = [DEFAULT_HUB_TIMEOUT]
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        with contextlib.suppress(ValueError):  # unset or not a number: huggingface_hub ignores it too
            own.append(float(os.environ.get(name, "")))
    return max(own)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist), for telling a download that progresses."""
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):  # a file renamed or removed by the download meanwhile
            total += path.lstat().st_size
    return total


def hub_cache_size(repo_id: str, repo_type: str = "model") -> int:
    """Bytes under a repository's folder in the huggingface_hub cache (partial downloads included): grows while
    a download makes progress."""
    from huggingface_hub import constants

    return folder_bytes(Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}")


def offline_hint(repo_id: str, repo_type: str = "model") -> str:
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return (
        f"to work offline, download it on a connected machine with `hf download {repo_id}{kind}` (or "
        "`huggingface-cli download`) and give the local folder, or set HF_HUB_OFFLINE=1 to use the local "
        "Hugging Face cache"
    )


def bounded_hub_call(
    call: Callable[[], T],
    what: str,
    repo_id: str,
    repo_type: str = "model",
    progress: Callable[[], int] | None = None,
) -> T:
    """`call()`, or an `ExpertMergeError` naming `what` and `repo_id` once it has made no progress (by default:
    no bytes added to the repository's hub cache folder) for `hub_timeout()` seconds. Errors of `call` pass."""
    limit = hub_timeout()
    progress = progress or (lambda: hub_cache_size(repo_id, repo_type))
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller, which re-raises it in its own thread
            outcome["error"] = error

    worker = threading.Thread(target=target, name=f"hub:{repo_id}", daemon=True)
    worker.start()
    seen, last_change = progress(), time.monotonic()
    while True:
        worker.join(_POLL_SECONDS)
        if not worker.is_alive():
            break
        now, size = time.monotonic(), progress()
        if size != seen:
            seen, last_change = size, now
        elif now - last_change >= limit:
            from huggingface_hub import constants

            raise ExpertMergeError(
                f"{what}: '{repo_id}' is not a local path and the Hugging Face hub ({constants.ENDPOINT}) gave "
                f"no answer within {limit:g} s ({HUB_TIMEOUT_ENV} sets the limit); "
                f"{offline_hint(repo_id, repo_type)}."
            )
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
