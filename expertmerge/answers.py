"""Expert-written answers: each `answers: expert` task's expert writes its answer to every calibration prompt.

Calibration data is usually prompts without answers; where a skill shows is the answer. Before the teacher
pass, every such task's expert (the base for `expert: base` tasks) generates its answer to each prompt of the
task's train and held-out splits: batched with left padding and the KV cache (`model.generate`), one expert in
memory at a time, loaded through the pool only when one of its entries misses the cache. The samples then hold
prompt + answer, so the teacher targets and the fit's losses cover the answer too; the texts' own next-token
loss on an answer the expert wrote is sequence-level distillation.

An entry is cached on disk like the teacher targets (checksummed safetensors), keyed by the expert's content
hash, the prompts' fingerprint, the generation settings, the EOS ids and the torch / transformers versions.
"""

from __future__ import annotations

import gc
import json
import os
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from expertmerge.hashing import json_hash, model_content_hash
from expertmerge.pool import BASE
from expertmerge.teachers import TeacherTargets, load_cached, save_cached

CACHE_FOLDER = "answers"
CACHE_FORMAT = 1
EMPTY_WARN_SHARE = 0.1  # warn when at least this share of a task's prompts get an empty answer
CUT_WARN_SHARE = 0.5  # warn when at least this share of a task's answers run to max_new_tokens
_GENERATED = [0]  # prompts answered by a model in this process (cache hits answer none)


@dataclass(frozen=True)
class AnswerSettings:
    """How a task's expert writes its answers (the task's `max_new_tokens`, `temperature`, `stop`)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    stop: tuple[str, ...] = ()
    seed: int = 0  # draws of sampled answers (`data.seed`); greedy answers need none

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass
class WrittenAnswers:
    """One (task, split)'s answers, row-aligned with its prompts: each answer's token ids (the closing EOS or
    stop string included) and whether it ended by itself (False: cut at `max_new_tokens`)."""

    tokens: list[list[int]]
    ended: list[bool]


@dataclass
class AnswerStats:
    computed: int = 0  # (task, split) entries generated
    reused: int = 0  # read back from the cache
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per task: prompts, empty, cut


def answers_generated() -> int:
    """How many prompts a model has answered in this process so far (cached answers count none)."""
    return _GENERATED[0]


def answer_key(
    expert_hash: str,
    prompts_fingerprint: str,
    settings: AnswerSettings,
    eos_ids: Sequence[int],
    batch_size: int,
) -> str:
    import transformers

    fields: dict[str, Any] = asdict(settings)
    if settings.sampling:
        fields["batch_size"] = batch_size  # a batch's rows share the random stream
    else:
        fields.pop("seed")  # greedy answers draw nothing
    return json_hash(
        {
            "format": CACHE_FORMAT,
            "expert": expert_hash,
            "prompts": prompts_fingerprint,
            "settings": fields,
            "eos": sorted(eos_ids),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
    )


def eos_ids(folder: str | os.PathLike, tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the model's generation config's EOS (its `config.json`'s where it has
    no generation config) and the tokenizer's; read from the folder, so a cache hit loads no model."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            if value is not None:
                ids.update(value if isinstance(value, list) else [value])
                break
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(int(i) for i in ids)


def _stop_at(
    answer: Sequence[int], ends: set[int], stop: Sequence[str], decode: Callable
) -> tuple[int, bool]:
    """The answer's length up to and including its first EOS or the token that completes a stop string, and
    whether it ended so (the rest of a finished row is padding that `generate` appended)."""
    for position, token in enumerate(answer):
        if token in ends:
            return position + 1, True
        if stop and any(s in decode(answer[: position + 1]) for s in stop):
            return position + 1, True
    return len(answer), False


def _stop_criteria(prompt_width: int, stop: Sequence[str], decode: Callable) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        """A row is done once its answer holds a stop string: the same test `_stop_at` cuts it by."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            texts = [decode(row) for row in input_ids[:, prompt_width:].tolist()]
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


@torch.no_grad()
def generate_answers(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: AnswerSettings,
    *,
    ends: Sequence[int],
    pad_id: int,
    decode: Callable[[list[int]], str],
    batch_size: int = 8,
    seed_name: str = "",
    advance: Callable[[int], None] | None = None,
) -> WrittenAnswers:
    """`model`'s answer to each right-padded prompt [n, L]: batches of similar length, left-padded, through
    `model.generate` (its KV cache); greedy, or sampled at `settings.temperature` with a generator seeded by
    `settings.seed` and `seed_name`."""
    from transformers import GenerationConfig

    model.eval()
    device = next(model.parameters()).device
    lengths = attention_mask.sum(dim=1).tolist()
    order = sorted(range(len(lengths)), key=lambda row: (lengths[row], row))  # little padding per batch
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.sampling,
        temperature=settings.temperature if settings.sampling else None,
        top_k=0 if settings.sampling else None,  # plain sampling: the model's own top-k / top-p do not apply
        top_p=1.0 if settings.sampling else None,
        repetition_penalty=1.0,
        eos_token_id=list(ends),
        pad_token_id=pad_id,
    )
    end_set = set(ends)
    tokens: list[list[int]] = [[] for _ in lengths]
    ended = [False] * len(lengths)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed((settings.seed * 1_000_003 + zlib.crc32(seed_name.encode())) % 2**63)
        for first in range(0, len(order), max(1, batch_size)):
            rows = order[first : first + batch_size]
            width = int(max(lengths[row] for row in rows))
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for slot, row in enumerate(rows):  # left padding: every prompt ends where generation starts
                length = int(lengths[row])
                ids[slot, width - length :] = input_ids[row, :length]
                mask[slot, width - length :] = 1
            output = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                stopping_criteria=_stop_criteria(width, settings.stop, decode) if settings.stop else None,
            )
            for slot, row in enumerate(rows):
                answer = output[slot, width:].tolist()
                length, ended[row] = _stop_at(answer, end_set, settings.stop, decode)
                tokens[row] = answer[:length]
            _GENERATED[0] += len(rows)
            if advance is not None:
                advance(len(rows))
    return WrittenAnswers(tokens, ended)


def _pack(answers: WrittenAnswers) -> TeacherTargets:
    lengths = [len(answer) for answer in answers.tokens]
    flat = [token for answer in answers.tokens for token in answer]
    return TeacherTargets(
        {
            "tokens": torch.tensor(flat, dtype=torch.int64),
            "lengths": torch.tensor(lengths, dtype=torch.int64),
            "ended": torch.tensor(answers.ended, dtype=torch.int64),
        }
    )


def _unpack(entry: TeacherTargets) -> WrittenAnswers:
    flat, lengths = entry.tensors["tokens"].tolist(), entry.tensors["lengths"].tolist()
    tokens, start = [], 0
    for length in lengths:
        tokens.append(flat[start : start + length])
        start += length
    return WrittenAnswers(tokens, [bool(e) for e in entry.tensors["ended"].tolist()])


def _device() -> torch.device:
    # Under DDP each rank has set its own CUDA device before the fit's set-up runs.
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def expert_answers(
    datamodule: Any,
    pool: Any,
    *,
    batch_size: int = 8,
    expert_hashes: Mapping[str, str] | None = None,
    splits: Sequence[str] = ("train", "eval"),
    device: torch.device | None = None,
) -> tuple[dict[tuple[str, str], list[list[int]]], AnswerStats]:
    """The answers to every prompt of every `answers: expert` task's splits, by the task's expert.

    `datamodule` is set up (`answer_tasks`, `prompt_samples`, `prompt_fingerprint`, `tokenizer`, `seed`);
    `pool` gives each writer's folder (`base_dir`, `expert_dirs`) and model (`load_model(name)`). Experts are
    visited one at a time and loaded only for the entries the cache lacks. A warning counts, per task, the
    prompts answered with nothing and the answers cut at `max_new_tokens`.
    """
    specs = {spec.name: spec for spec in datamodule.tasks}
    tokenizer = datamodule.tokenizer
    hashes = dict(expert_hashes or {})
    stats = AnswerStats()
    written: dict[tuple[str, str], WrittenAnswers] = {}
    writers: dict[str, list[str]] = {}
    for task in datamodule.answer_tasks:
        writers.setdefault(specs[task].expert, []).append(task)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids)

    total = sum(
        datamodule.prompt_samples(t, s).input_ids.shape[0] for t in datamodule.answer_tasks for s in splits
    )
    with Progress(transient=True) as progress:
        bar = progress.add_task("expert answers", total=total)
        for writer, tasks in writers.items():
            folder = pool.base_dir if writer == BASE else pool.expert_dirs[writer]
            if writer not in hashes:
                hashes[writer] = model_content_hash(folder)
            ends = eos_ids(folder, tokenizer)
            missing = _from_cache(datamodule, tasks, splits, (hashes[writer], ends, batch_size), written)
            stats.reused += sum(1 for task in tasks for split in splits if (task, split) in written)
            progress.advance(
                bar, sum(_count(datamodule, t, s) for t in tasks for s in splits if (t, s) in written)
            )
            if not missing:
                continue
            model = pool.load_model(writer).to(device or _device())
            for task, split, settings, key in missing:
                progress.update(bar, description=f"expert answers: {writer} on {task} ({split})")
                prompts = datamodule.prompt_samples(task, split)
                answers = generate_answers(
                    model,
                    prompts.input_ids,
                    prompts.attention_mask,
                    settings,
                    ends=ends,
                    pad_id=int(tokenizer.pad_token_id),
                    decode=decode,
                    batch_size=batch_size,
                    seed_name=f"{task}/{split}",
                    advance=lambda count: progress.advance(bar, count),
                )
                save_cached(key, _pack(answers), CACHE_FOLDER)
                written[(task, split)] = answers
                stats.computed += 1
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for task in datamodule.answer_tasks:
        parts = [written[(task, split)] for split in splits]
        pairs = [pair for part in parts for pair in zip(part.tokens, part.ended, strict=True)]
        stats.counts[task] = _warn_counts(task, specs[task], pairs, tokenizer)
    return {key: answers.tokens for key, answers in written.items()}, stats


def _count(datamodule: Any, task: str, split: str) -> int:
    return int(datamodule.prompt_samples(task, split).input_ids.shape[0])


def _from_cache(
    datamodule: Any,
    tasks: Sequence[str],
    splits: Sequence[str],
    writer: tuple[str, Any, int],
    written: dict[tuple[str, str], WrittenAnswers],
) -> list[tuple[str, str, AnswerSettings, str]]:
    """Fill `written` with one writer's cached answers; the (task, split, settings, key) entries it lacks.
    `writer`: its content hash, EOS ids and the batch size (in the key only when sampling)."""
    content_hash, ends, batch_size = writer
    specs = {spec.name: spec for spec in datamodule.tasks}
    missing = []
    for task in tasks:
        spec = specs[task]
        settings = AnswerSettings(
            int(spec.max_new_tokens), float(spec.temperature), tuple(spec.stop), int(datamodule.seed)
        )
        for split in splits:
            key = answer_key(
                content_hash, datamodule.prompt_fingerprint(task, split), settings, ends, batch_size
            )
            cached = load_cached(key, CACHE_FOLDER)
            if cached is None:
                missing.append((task, split, settings, key))
            else:
                written[(task, split)] = _unpack(cached)
    return missing


def _warn_counts(
    task: str, spec: Any, answers: list[tuple[list[int], bool]], tokenizer: Any
) -> dict[str, int]:
    """Count (and warn about) answers that say nothing and answers cut at `max_new_tokens`."""
    special = set(tokenizer.all_special_ids)
    empty = sum(1 for tokens, _ in answers if all(t in special for t in tokens))
    cut = sum(1 for _, ended in answers if not ended)
    counts = {"prompts": len(answers), "empty": empty, "cut": cut}
    if answers and empty >= EMPTY_WARN_SHARE * len(answers):
        warnings.warn(
            f"Task '{task}': expert '{spec.expert}' wrote nothing (an end-of-text token at once) for {empty} of "
            f"{len(answers)} prompts; those samples teach the merge to stop. Check that the prompts ask for an "
            "answer (a chat model needs `chat_template: true`), or set `answers: none`.",
            UserWarning,
            stacklevel=3,
        )
    if answers and cut >= CUT_WARN_SHARE * len(answers):
        warnings.warn(
            f"Task '{task}': {cut} of {len(answers)} answers by expert '{spec.expert}' ran to max_new_tokens "
            f"({spec.max_new_tokens}) without ending; raise `max_new_tokens`, add `stop` strings, or check that "
            "the expert ends its answers.",
            UserWarning,
            stacklevel=3,
        )
    return counts
