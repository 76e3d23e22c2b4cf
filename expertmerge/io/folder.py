"""The atomic output folder: checked before any work, written beside its final place, renamed in when complete.

Rules (issue 18):
- the output is checked before work: not an odd target (the current folder or one of its parents, `/`, the
  home folder), not one of the inputs, nor a folder holding one, nor a path inside an input folder (symbolic
  links resolved), not a dangling symbolic link, its parent a writable folder (or creatable), enough free
  space for the caller's estimate;
- `force` replaces an existing folder only if it carries our manifest (`expertmerge.json`), i.e. this tool
  wrote it; a folder we did not create is never removed;
- the temporary folder `.<name>.expertmerge-tmp-<pid>-<random>` holds a lock file with the owner's pid; a
  later run for the same output removes those whose owner is gone, and says so on stderr;
- every file gets the usual permissions (0666 and 0777 for folders, less the umask), whatever wrote it;
- a full disk (ENOSPC, EDQUOT) while writing is a one-line error naming the output and the space it needed,
  and Ctrl-C is `OutputInterrupted`; both remove the temporary first, so nothing is left at the output.

A single output file (`evaluate --json`) follows the same rules (`check_output_file`, `atomic_output_file`):
written to a temporary file beside it and renamed in; an existing file is replaced only with `force`, and only
when it is ours: a JSON object holding the `FILE_MARKER` key (`write_json_output` adds it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
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
FILE_MARKER = "expertmerge"  # top-level key of the JSON files we write: only those may be replaced by --force
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}

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
    """The inputs that are local paths: a `zoo://` reference is its folder in the cache (never built here: one
    not built yet holds nothing to protect); a hub id is no local path."""
    from expertmerge.paths import ZOO_SCHEME, cache_dir

    local = []
    for item in inputs:
        if item is None:
            continue
        if str(item).startswith(ZOO_SCHEME):
            path = cache_dir() / "zoo" / str(item)[len(ZOO_SCHEME) :]
        else:
            path = Path(item).expanduser()
        if path.exists():
            local.append((str(item), path.resolve()))
    return local


class OutputInterrupted(KeyboardInterrupt):
    """Ctrl-C while an output was written; its temporary is gone, so nothing was written at `output`."""

    def __init__(self, output: PathLike) -> None:
        super().__init__(f"interrupted; nothing written at {output}")
        self.output = output


def _refuse_dangling_link(path: Path, given: PathLike, kind: str) -> None:
    # Writing through a dangling link would create its target, wherever that points.
    if path.is_symlink() and not path.exists():
        raise ExpertMergeError(
            f"{kind} '{given}' is a dangling symbolic link (to '{os.readlink(path)}'); remove the link or "
            "choose another path."
        )


def _check_target(
    final: Path, given: PathLike, inputs: Iterable[PathLike | None], kind: str = "Output folder"
) -> None:
    cwd = Path.cwd().resolve()
    odd = {Path(final.anchor): "the file system root", Path.home().resolve(): "your home folder"}
    if final in odd:
        raise ExpertMergeError(f"{kind} '{given}' is {odd[final]}; give a new folder, e.g. --out merged.")
    if _is_within(cwd, final):
        raise ExpertMergeError(
            f"{kind} '{given}' is the current folder or one of its parents; give a new folder, e.g. --out merged."
        )
    for source, path in _local_inputs(inputs):
        if _is_within(path, final):
            what = "is" if path == final else "contains"
            raise ExpertMergeError(
                f"{kind} '{given}' {what} the input '{source}'; writing there would destroy an input. "
                "Choose another output."
            )
        if path.is_dir() and _is_within(final, path):
            raise ExpertMergeError(
                f"{kind} '{given}' is inside the input folder '{source}'; writing there would change an input. "
                "Choose an output outside it."
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
    force_flag: str = "--force",
) -> Path:
    """Fail before any work when the output cannot or must not be written; returns the resolved folder.

    `inputs`: the command's input folders (models, calibration files); `estimated_bytes`: the output's size;
    `force_flag`: how the calling command spells `force` (`fit` takes `--export.force true`), for the messages.
    """
    given = final
    _refuse_dangling_link(Path(final).expanduser(), given, "Output folder")
    final = Path(final).expanduser().resolve()
    _check_target(final, given, inputs)
    remove_stale_temporaries(final)
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise ExpertMergeError(f"Output path '{given}' exists and is not a folder.")
        if not force:
            raise ExpertMergeError(
                f"Output folder '{given}' already exists; pass {force_flag} to replace it, or choose another folder."
            )
        if not (final / MANIFEST).is_file():
            raise ExpertMergeError(
                f"Output folder '{given}' was not written by expertmerge (no {MANIFEST} in it), so {force_flag} "
                "does not replace it; remove it yourself or choose another folder."
            )
    _check_parent(final, given, estimated_bytes, "Output folder")
    return final


def _check_parent(final: Path, given: PathLike, estimated_bytes: int, kind: str) -> None:
    existing = _first_existing(final.parent)
    if not existing.is_dir():
        raise ExpertMergeError(
            f"{kind} '{given}': '{existing}' is a file, not a folder; choose another output."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExpertMergeError(
            f"{kind} '{given}': cannot write in '{existing}' (permission denied); choose another output."
        )
    if estimated_bytes > 0:
        free = shutil.disk_usage(existing).free
        if free < estimated_bytes:
            raise ExpertMergeError(
                f"{kind} '{given}': about {human_bytes(estimated_bytes)} needed, only {human_bytes(free)} free on "
                f"'{existing}'; free some space or choose another folder."
            )


def check_output_place(
    target: PathLike, inputs: Iterable[PathLike | None] = (), kind: str = "Output folder"
) -> Path:
    """The checks of an output that do not depend on what is there yet (for writers with rules of their own
    about an existing target, such as `zoo --out`): not a dangling link, not an odd place or an input, a
    writable parent. Returns the resolved path."""
    given = target
    path = Path(target).expanduser()
    _refuse_dangling_link(path, given, kind)
    final = path.resolve()
    _check_target(final, given, inputs, kind)
    _check_parent(final, given, 0, kind)
    return final


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _disk_full(
    kind: str, given: PathLike, where: Path, written: int, estimated_bytes: int
) -> ExpertMergeError:
    needed = (
        f"about {human_bytes(estimated_bytes)}"
        if estimated_bytes > written
        else f"more than {human_bytes(written)}"
    )
    free = shutil.disk_usage(_first_existing(where)).free
    return ExpertMergeError(
        f"{kind} '{given}': the disk filled up while writing ({human_bytes(written)} written, {needed} needed, "
        f"{human_bytes(free)} free on '{where}'); nothing was written. Free some space or choose another folder."
    )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_permissions(folder: Path) -> None:
    """0666 / 0777 less the umask: some writers (tempfile-style) create files 0600."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_manifest(folder: Path, command: str) -> None:
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
    force_flag: str = "--force",
) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; move it into place only if the block succeeds.

    On any error the temporary folder is removed, so a failed run never leaves a half-written output; a run
    killed outright leaves it with its lock, and the next run for the same output removes it.
    """
    inputs = list(inputs)
    given = final
    final = check_output_dir(final, force, inputs, estimated_bytes, force_flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        yield tmp
        write_manifest(tmp, command)
        (tmp / LOCK).unlink()
        usual_permissions(tmp)
        check_output_dir(final, force, inputs, force_flag=force_flag)  # the target may have changed meanwhile
        if final.exists():
            trash = final.parent / f".{final.name}{OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
    except OSError as error:
        written = _tree_bytes(tmp) if error.errno in _DISK_FULL else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno in _DISK_FULL:
            raise _disk_full("Output folder", given, final.parent, written, estimated_bytes) from error
        raise
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputInterrupted(given) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ours(path: Path) -> bool:
    """Whether the existing file `path` is a JSON object we wrote (it holds our `FILE_MARKER` key)."""
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get(FILE_MARKER), dict)


def check_output_file(
    target: PathLike,
    force: bool,
    inputs: Iterable[PathLike | None] = (),
    label: str = "Output file",
    estimated_bytes: int = 0,
    existing: bool = True,
) -> Path:
    """Fail before any work when the output file cannot or must not be written; returns the resolved path.

    As for folders: never an input nor a path inside an input folder, never a dangling link; its folder must
    exist (a typo there would otherwise lose the results at the end) and be writable; an existing file is
    replaced only with `force`, and only if we wrote it (`existing=False` leaves that rule to a later check,
    once every input is known: an input named as the output is then reported as such).
    """
    given = target
    path = Path(target).expanduser()
    _refuse_dangling_link(path, given, label)
    final = path.resolve()
    _check_target(final, given, inputs, label)
    if final.is_dir():
        raise ExpertMergeError(
            f"{label} '{given}' is a folder; give a file name, e.g. '{path / 'scores.json'}'."
        )
    if not final.parent.is_dir():
        raise ExpertMergeError(f"{label} '{given}': folder '{path.parent}' does not exist; create it first.")
    if existing and final.exists():
        if not force:
            raise ExpertMergeError(
                f"{label} '{given}' already exists; pass --force to replace it, or choose another file."
            )
        if not _ours(final):
            raise ExpertMergeError(
                f"{label} '{given}' was not written by expertmerge (no '{FILE_MARKER}' key in it), so --force "
                "does not replace it; remove it yourself or choose another file."
            )
    _check_parent(final, given, estimated_bytes, label)
    return final


@contextlib.contextmanager
def atomic_output_file(
    target: PathLike,
    force: bool = False,
    inputs: Iterable[PathLike | None] = (),
    label: str = "Output file",
) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    inputs = list(inputs)
    given = target
    final = check_output_file(target, force, inputs, label)
    tmp = final.parent / f".{final.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        check_output_file(given, force, inputs, label)  # the target may have changed while we worked
        os.replace(tmp, final)
    except OSError as error:
        written = tmp.stat().st_size if tmp.is_file() and error.errno in _DISK_FULL else 0
        tmp.unlink(missing_ok=True)
        if error.errno in _DISK_FULL:
            raise _disk_full(label, given, final.parent, written, 0) from error
        raise
    except KeyboardInterrupt:
        tmp.unlink(missing_ok=True)
        raise OutputInterrupted(given) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_output(
    target: PathLike,
    data: dict,
    command: str,
    force: bool = False,
    inputs: Iterable[PathLike | None] = (),
    label: str = "Output file",
) -> Path:
    """Write `data` with our marker key as JSON to `target`, atomically, under `check_output_file`'s rules."""
    from expertmerge import __version__

    marked = {FILE_MARKER: {"tool": "expertmerge", "version": __version__, "command": command}, **data}
    with atomic_output_file(target, force, inputs, label) as tmp:
        tmp.write_text(json.dumps(marked, indent=1) + "\n")
    return Path(target)


def replace_file(path: Path, text: str) -> None:
    """Rewrite a file of an output we own, atomically (a temporary beside it, renamed in)."""
    tmp = path.parent / f".{path.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
