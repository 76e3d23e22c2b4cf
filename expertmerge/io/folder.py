"""The atomic output folder: checked before any work, written beside its final place, renamed in when complete.

Rules (issue 18):
- the output is checked before work: not an odd target (the current folder or one of its parents, `/`, the
  home folder), not one of the inputs nor a folder holding one, its parent a writable folder (or creatable),
  enough free space for the caller's estimate;
- `force` replaces an existing folder only if it carries our manifest (`expertmerge.json`), i.e. this tool
  wrote it; a folder we did not create is never removed;
- the temporary folder `.<name>.expertmerge-tmp-<pid>-<random>` holds a lock file with the owner's pid; a
  later run for the same output removes those whose owner is gone, and says so on stderr;
- every file gets the usual permissions (0666 and 0777 for folders, less the umask), whatever wrote it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from expertmerge.errors import ExpertMergeError

MANIFEST = "expertmerge.json"  # our marker: only folders holding it may be replaced by --force
LOCK = ".expertmerge-lock"  # inside a temporary folder: who is writing it
TMP_TAG = ".expertmerge-tmp-"
OLD_TAG = ".expertmerge-old-"  # a replaced output on its way out

PathLike = str | os.PathLike


def human_bytes(size: float) -> str:
    """`1234567` -> `1.2 MB` (decimal units, as sizes are shown everywhere in this tool)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _local_inputs(inputs: Iterable[PathLike | None]) -> list[tuple[str, Path]]:
    """The inputs that are local paths (hub ids and `zoo://` references are not user folders)."""
    local = []
    for item in inputs:
        if item is None or str(item).startswith("zoo://"):
            continue
        path = Path(item).expanduser()
        if path.exists():
            local.append((str(item), path.resolve()))
    return local


def _check_target(final: Path, given: PathLike, inputs: Iterable[PathLike | None]) -> None:
    cwd = Path.cwd().resolve()
    odd = {Path(final.anchor): "the file system root", Path.home().resolve(): "your home folder"}
    if final in odd:
        raise ExpertMergeError(
            f"Output folder '{given}' is {odd[final]}; give a new folder, e.g. --out merged."
        )
    if _is_within(cwd, final):
        raise ExpertMergeError(
            f"Output folder '{given}' is the current folder or one of its parents; give a new folder, "
            "e.g. --out merged."
        )
    for source, path in _local_inputs(inputs):
        if _is_within(path, final):
            what = "is" if path == final else "contains"
            raise ExpertMergeError(
                f"Output folder '{given}' {what} the input '{source}'; writing there would destroy an input. "
                "Choose another output folder."
            )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove `final`'s temporary (and half-replaced) folders whose writer is gone; return what was removed.

    Only folders with our exact name pattern and our lock or manifest inside are touched.
    """
    removed: list[Path] = []
    parent = final.parent
    if not parent.is_dir():
        return removed
    for tag in (TMP_TAG, OLD_TAG):
        prefix = f".{final.name}{tag}"
        for entry in sorted(parent.glob(f"{glob.escape(prefix)}*")):
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            ours = (entry / LOCK).is_file() or (entry / MANIFEST).is_file()
            if not entry.is_dir() or not pid_text.isdigit() or not ours or _pid_alive(int(pid_text)):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            sys.stderr.write(
                f"expertmerge: removed '{entry}', a temporary folder left by process {pid_text} "
                "(no longer running)\n"
            )
    return removed


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(
    final: PathLike,
    force: bool,
    inputs: Iterable[PathLike | None] = (),
    estimated_bytes: int = 0,
) -> Path:
    """Fail before any work when the output cannot or must not be written; returns the resolved folder.

    `inputs`: the command's input folders (models, calibration files); `estimated_bytes`: the output's size.
    """
    given = final
    final = Path(final).expanduser().resolve()
    _check_target(final, given, inputs)
    remove_stale_temporaries(final)
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise ExpertMergeError(f"Output path '{given}' exists and is not a folder.")
        if not force:
            raise ExpertMergeError(
                f"Output folder '{given}' already exists; pass --force to replace it, or choose another folder."
            )
        if not (final / MANIFEST).is_file():
            raise ExpertMergeError(
                f"Output folder '{given}' was not written by expertmerge (no {MANIFEST} in it), so --force does "
                "not replace it; remove it yourself or choose another folder."
            )
    existing = _first_existing(final.parent)
    if not existing.is_dir():
        raise ExpertMergeError(
            f"Output folder '{given}': '{existing}' is a file, not a folder; choose another output folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExpertMergeError(
            f"Output folder '{given}': cannot write in '{existing}' (permission denied); choose another folder."
        )
    if estimated_bytes > 0:
        free = shutil.disk_usage(existing).free
        if free < estimated_bytes:
            raise ExpertMergeError(
                f"Output folder '{given}': about {human_bytes(estimated_bytes)} needed, only {human_bytes(free)} free on "
                f"'{existing}'; free some space or choose another folder."
            )
    return final


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_permissions(folder: Path) -> None:
    """0666 / 0777 less the umask: some writers (tempfile-style) create files 0600."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _write_manifest(folder: Path, command: str) -> None:
    from expertmerge import __version__

    manifest = {
        "tool": "expertmerge",
        "version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


@contextlib.contextmanager
def atomic_output_dir(
    final: PathLike,
    force: bool = False,
    inputs: Iterable[PathLike | None] = (),
    estimated_bytes: int = 0,
    command: str = "",
) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; move it into place only if the block succeeds.

    On any error the temporary folder is removed, so a failed run never leaves a half-written output; a run
    killed outright leaves it with its lock, and the next run for the same output removes it.
    """
    inputs = list(inputs)
    final = check_output_dir(final, force, inputs, estimated_bytes)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        yield tmp
        _write_manifest(tmp, command)
        (tmp / LOCK).unlink()
        _usual_permissions(tmp)
        check_output_dir(final, force, inputs)  # the target may have changed while we worked
        if final.exists():
            trash = final.parent / f".{final.name}{OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
