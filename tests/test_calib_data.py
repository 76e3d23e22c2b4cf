"""CalibrationDataModule and its batch sampler, on real files and a real (byte-level) tokenizer.

The tokenizer has no merges: one token per UTF-8 byte, plus a <s> in front of every encoded text, so a text's
token count is `len(text) + 1` and every expected length below is plain arithmetic.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from calib_data import (
    CORPORA_DIR,
    BalancedTaskBatchSampler,
    CalibrationDataModule,
    TaskSpec,
    collate_task_batch,
    resolve_source,
)
from expertmerge.errors import ExpertMergeError

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
SHIPPED = ("math_word_problems.jsonl", "math_word_problems_fr.jsonl", "python_code.jsonl", "prose.jsonl")


# ------------------------------------------------------------------------------------------- fixtures
def _byte_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>"]
    # Vocabulary = the 256 byte symbols + specials: no merges, so one token per byte.
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + len(specials), special_tokens=specials, initial_alphabet=alphabet
    )
    tokenizer.train_from_iterator(["abc"], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # No pad token on purpose: the datamodule must fall back to eos.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("byte_tokenizer")
    _byte_tokenizer(CHAT_TEMPLATE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("byte_tokenizer_no_chat")
    _byte_tokenizer(None).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="session")
def _datasets_cache_in_tmp(tmp_path_factory):
    """`datasets` caches what it parses; keep that out of the user's cache and quiet its progress bars."""
    import datasets

    original = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets_cache")
    datasets.disable_progress_bars()
    yield
    datasets.config.HF_DATASETS_CACHE = original


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def texts(prefix: str, count: int, width: int = 0) -> list[str]:
    """Distinct texts `<prefix> sample <i>`, padded with dots to at least `width` characters."""
    return [f"{prefix} sample {i}".ljust(width, ".") for i in range(count)]


def module(tasks, tokenizer, **settings) -> CalibrationDataModule:
    defaults = dict(samples_per_task=6, eval_samples_per_task=2, max_length=64, batch_size=2, seed=0)
    return CalibrationDataModule(tasks, tokenizer=str(tokenizer), **{**defaults, **settings})


def decode_rows(dm: CalibrationDataModule, task: str, split: str, skip_special: bool = True) -> list[str]:
    samples = dm.task_samples(task, split)
    return [
        dm.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=skip_special)
        for ids, mask in zip(samples.input_ids, samples.attention_mask, strict=True)
    ]


def row_tuples(dm: CalibrationDataModule, task: str, split: str) -> set[tuple[int, ...]]:
    samples = dm.task_samples(task, split)
    return {
        tuple(ids[mask.bool()].tolist())
        for ids, mask in zip(samples.input_ids, samples.attention_mask, strict=True)
    }


def batch_keys(loader) -> list[tuple[int, tuple[int, ...]]]:
    return [(batch["task_index"], tuple(batch["sample_index"].tolist())) for batch in loader]


@pytest.fixture
def three_tasks(tmp_path) -> list[TaskSpec]:
    files = {
        name: write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in texts(name, 20)])
        for name in ("math", "code", "prose")
    }
    return [TaskSpec(name, f"{name}_expert", [str(path)]) for name, path in files.items()]


# ------------------------------------------------------------------------------------------- samples
def test_sample_counts_per_task_and_held_out_split_is_disjoint(three_tasks, tokenizer_dir):
    dm = module(three_tasks, tokenizer_dir, samples_per_task=7, eval_samples_per_task=3)
    dm.check(["math_expert", "code_expert", "prose_expert"])
    dm.setup("fit")
    assert dm.task_names == ["math", "code", "prose"]
    for task in dm.task_names:
        assert dm.task_samples(task, "train").input_ids.shape[0] == 7
        assert dm.task_samples(task, "val").input_ids.shape[0] == 3
        assert not row_tuples(dm, task, "train") & row_tuples(dm, task, "val")
        decoded = decode_rows(dm, task, "train") + decode_rows(dm, task, "val")
        assert len(set(decoded)) == 10
        assert set(decoded) <= set(texts(task, 20))  # each task's samples come from its own file
    # "eval" is the same split as "val" (the teacher cache and the CLI use that name).
    assert dm.task_samples("math", "eval") is dm.task_samples("math", "val")
    with pytest.raises(ValueError, match="'train' or 'val'"):
        dm.task_samples("math", "test")
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        dm.task_samples("nope", "train")


def test_local_files_load_without_a_datasets_bar_and_leave_the_setting_alone(
    three_tasks, tokenizer_dir, capfd
):
    import datasets

    datasets.enable_progress_bars()
    dm = module(three_tasks, tokenizer_dir, samples_per_task=7, eval_samples_per_task=3)
    dm.setup("fit")  # called directly (a benchmark, the router tuner), not only inside the fit CLI
    assert "Generating train split" not in "".join(capfd.readouterr())
    assert datasets.is_progress_bar_enabled()


def test_held_out_split_does_not_depend_on_samples_per_task(three_tasks, tokenizer_dir):
    small = module(three_tasks, tokenizer_dir, samples_per_task=3)
    large = module(three_tasks, tokenizer_dir, samples_per_task=12)
    small.setup()
    large.setup()
    assert torch.equal(
        small.task_samples("code", "val").input_ids, large.task_samples("code", "val").input_ids
    )
    assert row_tuples(small, "code", "train") < row_tuples(large, "code", "train")


def _grouped(tmp_path, sizes: list[int]) -> TaskSpec:
    """One task whose texts come from sources g0, g1, ... with `sizes[i]` texts in source g<i>."""
    rows = [
        {"text": f"source {g} text {i}", "doc": f"g{g}"} for g, size in enumerate(sizes) for i in range(size)
    ]
    return TaskSpec("docs", "e", str(write_jsonl(tmp_path / "docs.jsonl", rows)), group_field="doc")


def _groups_of(dm: CalibrationDataModule, split: str) -> list[str]:
    return [text.split(" text ")[0].replace("source ", "g") for text in decode_rows(dm, "docs", split)]


@pytest.mark.filterwarnings("ignore:Task 'docs' has 26 usable samples")
def test_group_field_keeps_held_out_sources_apart(tmp_path, tokenizer_dir):
    task = _grouped(tmp_path, [5, 3, 4, 2, 6, 1, 3, 2])  # 26 texts in 8 sources
    dm = module([task], tokenizer_dir, samples_per_task=10, eval_samples_per_task=4)
    dm.setup()
    held, train = _groups_of(dm, "eval"), _groups_of(dm, "train")
    assert len(held) == 4 and len(train) == 10
    assert not set(held) & set(train)  # no source on both sides
    assert len(set(held)) >= 1 and len(set(train)) >= 2
    # The held-out part does not move with samples_per_task (the teacher cache's eval targets stay valid).
    more = module([task], tokenizer_dir, samples_per_task=14, eval_samples_per_task=4)
    more.setup()
    assert torch.equal(more.task_samples("docs", "eval").input_ids, dm.task_samples("docs", "eval").input_ids)
    assert row_tuples(dm, "docs", "train") < row_tuples(more, "docs", "train")
    # Without group_field the same file splits at random: with these numbers some source lands on both sides.
    plain = module(
        [TaskSpec("docs", "e", task.sources)], tokenizer_dir, samples_per_task=10, eval_samples_per_task=4
    )
    plain.setup()
    assert set(_groups_of(plain, "eval")) & set(_groups_of(plain, "train"))


def test_group_roles_fill_the_held_out_part_from_whole_groups_first_come():
    from calib_data.groups import group_roles

    roles = group_roles(list("AABBBCCDDE"), 3, 4)
    # A (2) and B hold out: B lends one sample, its other two are unused; C, D, E train, up to 4.
    assert roles == ["eval", "eval", "eval", None, None, "train", "train", "train", "train", None]
    # One big group: 8 held out, the rest of it unused; the next group trains.
    assert group_roles(list("AAAAAAAAAAB"), 8, 16) == ["eval"] * 8 + [None, None, "train"]
    # Each role depends only on the samples before it: a prefix has the prefix's roles.
    long = list("ABACDBBEFAGGH")
    assert group_roles(long[:7], 3, 5) == group_roles(long, 3, 5)[:7]


def test_group_roles_balanced_draws_the_training_part_in_rounds_over_groups():
    from calib_data.groups import group_roles

    groups = list("AABBBBBCCDE")
    # First come: B (the big source) fills the training part.
    assert group_roles(groups, 2, 4) == ["eval"] * 2 + ["train"] * 4 + [None] * 5
    # Balanced: one text of B, C, D, E (first seen first), then B's second if more were wanted.
    assert group_roles(groups, 2, 4, balanced=True) == (
        ["eval"] * 2 + ["train", None, None, None, None, "train", None, "train", "train"]
    )
    assert group_roles(groups, 2, 5, balanced=True) == (
        ["eval"] * 2 + ["train", "train", None, None, None, "train", None, "train", "train"]
    )
    # The held-out part is the same either way.
    for n_train in (1, 3, 9):
        plain, balanced = group_roles(groups, 2, n_train), group_roles(groups, 2, n_train, balanced=True)
        assert [r == "eval" for r in plain] == [r == "eval" for r in balanced]


@pytest.mark.filterwarnings("ignore:Task 'docs' has")
def test_group_balance_spreads_the_training_texts_over_sources(tmp_path, tokenizer_dir):
    task = _grouped(tmp_path, [2, 30, 2, 2, 2, 2])  # one source holds most texts
    plain = module([task], tokenizer_dir, samples_per_task=6, eval_samples_per_task=2)
    balanced = module([task], tokenizer_dir, samples_per_task=6, eval_samples_per_task=2, group_balance=True)
    plain.setup()
    balanced.setup()
    assert torch.equal(
        plain.task_samples("docs", "eval").input_ids, balanced.task_samples("docs", "eval").input_ids
    )
    held = set(_groups_of(plain, "eval"))
    spread = _groups_of(balanced, "train")
    assert len(spread) == 6 and not set(spread) & held
    # Every training source gives at most ceil(6 / sources) texts, and more sources train than in shuffled order.
    sources = {g for g in ("g0", "g1", "g2", "g3", "g4", "g5") if g not in held}
    assert max(spread.count(g) for g in set(spread)) <= -(-6 // len(sources))
    assert len(set(spread)) == min(6, len(sources)) > len(set(_groups_of(plain, "train")))
    # Without any group_field it would do nothing: the cheap checks say so.
    ungrouped = TaskSpec("docs", "e", task.sources)
    with pytest.warns(UserWarning, match=r"group_balance is true, but no task sets `group_field`"):
        module([ungrouped], tokenizer_dir, group_balance=True).check()


def test_group_field_errors_name_the_key(tmp_path, tokenizer_dir):
    task = _grouped(tmp_path, [4, 3])
    missing = TaskSpec("docs", "e", task.sources, group_field="file")
    with pytest.raises(ExpertMergeError) as error:
        module([missing], tokenizer_dir).check()
    for part in ("Task 'docs'", "no column 'file'", "data.tasks[0].group_field", "doc"):
        assert part in str(error.value)
    # Every group is needed to fill the held-out part: nothing would be left to train on.
    with pytest.raises(
        ExpertMergeError, match=r"fall in 2 group\(s\).*eval_samples_per_task` = 8.*no group is left"
    ):
        module([task], tokenizer_dir, eval_samples_per_task=8).setup()
    with pytest.raises(ExpertMergeError, match=r"`data.tasks\[0\].group_field` of task 'docs' is 3"):
        module([TaskSpec("docs", "e", task.sources, group_field=3)], tokenizer_dir).check()
    # Too few texts for both parts: a warning says what each part got (one held-out text from the first group
    # met, the other two groups train).
    three = _grouped(tmp_path, [3, 3, 3])
    with pytest.warns(
        UserWarning, match=r"9 usable samples in 3 groups.*using 6 for training and 1 held out"
    ):
        module([three], tokenizer_dir, samples_per_task=20, eval_samples_per_task=1).setup()


def test_truncation_to_max_length_and_right_padding_masked(tmp_path, tokenizer_dir):
    lengths = [5, 9, 14, 30, 60, 61, 200]
    rows = [{"text": chr(ord("a") + i) * n} for i, n in enumerate(lengths)]
    task = TaskSpec("t", "e", str(write_jsonl(tmp_path / "t.jsonl", rows)))
    dm = module([task], tokenizer_dir, samples_per_task=6, eval_samples_per_task=1, max_length=20)
    dm.setup()
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id  # the tokenizer had no pad token
    train, held_out = dm.task_samples("t", "train"), dm.task_samples("t", "val")
    assert train.input_ids.shape == (6, 20) and held_out.input_ids.shape[0] == 1
    real = [length for split in (train, held_out) for length in split.attention_mask.sum(dim=1).tolist()]
    # <s> + one token per byte, cut at max_length.
    assert sorted(real) == sorted(min(n + 1, 20) for n in lengths)
    for split in (train, held_out):
        width = split.input_ids.shape[1]  # each split is padded to its own longest sample
        assert width == int(split.attention_mask.sum(dim=1).max())
        for ids, mask in zip(split.input_ids, split.attention_mask, strict=True):
            length = int(mask.sum())
            assert mask[:length].tolist() == [1] * length  # right padding: real tokens first
            assert mask[length:].tolist() == [0] * (width - length)
            assert set(ids[length:].tolist()) <= {dm.tokenizer.pad_token_id}
            assert int(ids[0]) == dm.tokenizer.bos_token_id


def test_short_empty_and_duplicate_texts_are_skipped(tmp_path, tokenizer_dir):
    rows = [{"text": t} for t in ["", "   ", "abc", "abcd", "abcd", "wxyz", None, "hello world"]]
    task = TaskSpec("t", "e", str(write_jsonl(tmp_path / "t.jsonl", rows)))
    dm = module([task], tokenizer_dir, samples_per_task=10, eval_samples_per_task=1)
    with pytest.warns(UserWarning, match="Task 't' has 3 usable samples"):
        dm.setup()
    kept = decode_rows(dm, "t", "train") + decode_rows(dm, "t", "val")
    assert sorted(kept) == ["abcd", "hello world", "wxyz"]  # "abc" is 3 tokens < min_tokens 4

    strict = module([TaskSpec("t", "e", str(tmp_path / "t.jsonl"), min_tokens=5)], tokenizer_dir)
    with pytest.raises(
        ExpertMergeError, match="Task 't' has 1 usable samples.*at least 2.*at least 5 tokens"
    ):
        strict.setup()  # one sample cannot give both a train and a held-out split


# ------------------------------------------------------------------------------------------- batches
def test_every_batch_is_one_task_and_tasks_are_balanced_round_robin(three_tasks, tokenizer_dir):
    dm = module(three_tasks, tokenizer_dir, samples_per_task=7, eval_samples_per_task=3, batch_size=3)
    dm.setup()
    batches = list(dm.train_dataloader())
    # ceil(7 / 3) = 3 batches per task, interleaved math, code, prose, math, ...
    assert [b["task_index"] for b in batches] == [0, 1, 2] * 3
    for task_index, task in enumerate(dm.task_names):
        rows = [b["sample_index"].tolist() for b in batches if b["task_index"] == task_index]
        assert [len(r) for r in rows] == [3, 3, 1]
        assert sorted(sum(rows, [])) == list(range(7))  # every train row exactly once per epoch
        samples = dm.task_samples(task, "train")
        for batch in (b for b in batches if b["task_index"] == task_index):
            index = batch["sample_index"]
            width = batch["input_ids"].shape[1]
            # Trimmed to the batch's longest sample; the rows are the split's rows at sample_index.
            assert width == int(samples.attention_mask[index].sum(dim=1).max())
            assert torch.equal(batch["input_ids"], samples.input_ids[index, :width])
            assert torch.equal(batch["attention_mask"], samples.attention_mask[index, :width])
            assert batch["sample_index"].dtype == torch.long
    dm.batch_size = 2  # val: 3 rows per task -> batches of 2 and 1, tasks interleaved, rows in order
    val = [(b["task_index"], b["sample_index"].tolist()) for b in dm.val_dataloader()]
    assert val == [(0, [0, 1]), (1, [0, 1]), (2, [0, 1]), (0, [2]), (1, [2]), (2, [2])]


def test_sampler_balances_uneven_tasks():
    sampler = BalancedTaskBatchSampler([10, 3, 7], batch_size=4, seed=1)
    batches = sampler.global_batches()
    assert len(sampler) == len(batches) == 3 * 3  # ceil(10 / 4) batches for every task
    assert [task for task, _ in batches] == [0, 1, 2] * 3
    per_task = {t: [rows for task, rows in batches if task == t] for t in range(3)}
    # Every task contributes as many samples as the largest (capped by its size per batch).
    assert [len(r) for r in per_task[0]] == [4, 4, 2]
    assert [len(r) for r in per_task[1]] == [3, 3, 2]
    assert [len(r) for r in per_task[2]] == [4, 4, 2]
    assert sorted(sum(per_task[0], [])) == list(range(10))
    for rows_of_task, size in ((per_task[1], 3), (per_task[2], 7)):
        for rows in rows_of_task:
            assert len(set(rows)) == len(rows)  # no row twice within a batch
        counts = Counter(sum(rows_of_task, []))
        assert set(counts) == set(range(size))  # a small task cycles through all its rows
        assert max(counts.values()) - min(counts.values()) <= 1


def test_batch_order_is_deterministic_by_seed_and_changes_with_seed_and_epoch(three_tasks, tokenizer_dir):
    def order(seed: int, epoch: int = 0):
        dm = module(three_tasks, tokenizer_dir, samples_per_task=8, seed=seed)
        dm.setup()
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)  # what Lightning calls at every epoch
        return batch_keys(loader), {t: row_tuples(dm, t, "train") for t in dm.task_names}

    first, first_rows = order(seed=0)
    again, again_rows = order(seed=0)
    assert first == again and first_rows == again_rows
    other, other_rows = order(seed=1)
    assert other != first
    assert other_rows != first_rows  # the seed also picks which texts are sampled
    later, _ = order(seed=0, epoch=1)
    assert later != first and [t for t, _ in later] == [t for t, _ in first]
    assert order(seed=0, epoch=1)[0] == later


def test_distributed_ranks_get_disjoint_batches_of_equal_count():
    single = BalancedTaskBatchSampler([8, 8], batch_size=2, seed=3, rank=0, world_size=1)
    ranks = [
        list(BalancedTaskBatchSampler([8, 8], batch_size=2, seed=3, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 4
    as_sets = [{tuple(b) for b in rank} for rank in ranks]
    assert not as_sets[0] & as_sets[1]
    assert sorted(ranks[0] + ranks[1]) == sorted(list(single))
    # 3 tasks x 3 batches = 9 does not split in 2: the order wraps so both ranks still run 5 steps.
    uneven = [BalancedTaskBatchSampler([5, 5, 5], batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    assert [len(s) for s in uneven] == [5, 5] and [len(list(s)) for s in uneven] == [5, 5]


def test_train_dataloader_shards_across_torch_distributed_ranks(monkeypatch, three_tasks, tokenizer_dir):
    import calib_data.sampler as sampler

    dm = module(three_tasks, tokenizer_dir, samples_per_task=8, batch_size=2)
    dm.setup()
    everything = batch_keys(dm.train_dataloader())
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(sampler, "_distributed_rank_and_world", lambda rank=rank: (rank, 2))
        per_rank.append(batch_keys(dm.train_dataloader()))
    assert len(everything) == 12 and len(per_rank[0]) == len(per_rank[1]) == 6
    assert per_rank[0] == everything[0::2] and per_rank[1] == everything[1::2]
    assert not set(per_rank[0]) & set(per_rank[1])


def test_distributed_trainer_must_leave_the_sampler_alone(three_tasks, tokenizer_dir):
    import pytorch_lightning as pl

    dm = module(three_tasks, tokenizer_dir)
    dm.setup()
    dm.trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", logger=False)
    with pytest.raises(ExpertMergeError, match="use_distributed_sampler=False"):
        dm.train_dataloader()
    dm.trainer = pl.Trainer(
        strategy="ddp", devices=2, accelerator="cpu", logger=False, use_distributed_sampler=False
    )
    # The trainer's world size shards the batches: 3 tasks x ceil(6 / 2) = 9 batches, 5 per rank.
    assert len(dm.train_dataloader()) == 5


def test_collate_refuses_a_batch_of_two_tasks():
    row = torch.ones(3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="one task"):
        collate_task_batch([(0, 0, row, row), (1, 0, row, row)])


def test_lightning_trainer_sets_the_epoch_and_sees_balanced_batches(three_tasks, tokenizer_dir):
    import pytorch_lightning as pl

    seen: list[tuple[int, int, tuple[int, ...]]] = []

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append((self.current_epoch, batch["task_index"], tuple(batch["sample_index"].tolist())))
            return (self.weight * batch["attention_mask"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = module(three_tasks, tokenizer_dir, samples_per_task=4, batch_size=2)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    trainer.fit(Recorder(), datamodule=dm)
    epochs = [[(t, rows) for e, t, rows in seen if e == epoch] for epoch in (0, 1)]
    assert [len(e) for e in epochs] == [6, 6]
    assert all(Counter(t for t, _ in e) == {0: 2, 1: 2, 2: 2} for e in epochs)
    assert epochs[0] != epochs[1]  # Lightning reached the sampler's set_epoch


def test_train_loader_state_resumes_at_the_batch_it_was_taken_at(three_tasks, tokenizer_dir):
    dm = module(three_tasks, tokenizer_dir, samples_per_task=8, batch_size=2)  # 12 batches per epoch
    dm.setup()
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(1)
    whole_epoch = batch_keys(loader)
    loader.batch_sampler.set_epoch(2)
    next_epoch = batch_keys(loader)

    loader.batch_sampler.set_epoch(1)
    taken = []
    for batch in loader:
        taken.append((batch["task_index"], tuple(batch["sample_index"].tolist())))
        if len(taken) == 5:
            state = loader.state_dict()
            break
    assert (state["epoch"], state["batches"]) == (1, 5)

    restored = module(three_tasks, tokenizer_dir, samples_per_task=8, batch_size=2)
    restored.setup()
    resumed = restored.train_dataloader()
    resumed.load_state_dict(state)
    resumed.batch_sampler.set_epoch(1)  # Lightning sets the restored epoch again
    assert taken + batch_keys(resumed) == whole_epoch
    assert resumed.state_dict()["batches"] == 12
    # A state taken at an epoch's end: the loop goes on with the next epoch, from its first batch.
    at_end = restored.train_dataloader()
    at_end.load_state_dict(resumed.state_dict())
    at_end.batch_sampler.set_epoch(2)
    assert batch_keys(at_end) == next_epoch

    # A checkpoint of other batch settings cannot say where to go on: its epoch starts over, with a warning.
    other = module(three_tasks, tokenizer_dir, samples_per_task=8, batch_size=4)
    other.setup()
    loader = other.train_dataloader()
    with pytest.warns(UserWarning, match=r"batch_size 2 -> 4.*starts its epoch from the first batch"):
        loader.load_state_dict(state)
    assert len(batch_keys(loader)) == len(loader)


def test_lightning_resumes_mid_epoch_with_the_same_batches_and_random_draws(
    three_tasks, tokenizer_dir, tmp_path
):
    """A checkpoint taken between epochs' ends, under gradient accumulation: the resumed fit's steps see the
    batches and draw the random numbers the uninterrupted fit's steps did."""
    import warnings

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, int, tuple[int, ...], float]] = []

        def training_step(self, batch, batch_idx):
            noise = torch.rand(1)  # stands for any random draw of a step (dropout, noise, random prefixes)
            rows = tuple(batch["sample_index"].tolist())
            self.seen.append((self.global_step, batch["task_index"], rows, float(noise)))
            return (self.weight * batch["attention_mask"].float().mean() + noise).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt_path: str | None = None) -> list:
        pl.seed_everything(0)
        dm = module(three_tasks, tokenizer_dir, samples_per_task=8, batch_size=2)  # 12 batches per epoch
        recorder = Recorder()
        trainer = pl.Trainer(
            max_steps=max_steps,
            accumulate_grad_batches=2,  # 6 steps per epoch
            accelerator="cpu",
            logger=False,
            callbacks=[ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=8, save_top_k=-1)],
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            limit_val_batches=0,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*dataloader is not resumable.*")
            trainer.fit(recorder, datamodule=dm, ckpt_path=ckpt_path)
        return recorder.seen

    straight = fit(max_steps=11)
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert "step=8" in checkpoint.name  # 16 batches in: 4 batches into the second epoch
    resumed = fit(max_steps=11, ckpt_path=str(checkpoint))
    assert len(straight) == 22 and len(resumed) == 6
    assert resumed == straight[16:]


# ------------------------------------------------------------------------------------------- fingerprints
def test_fingerprints_are_stable_and_follow_the_data(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts("t", 12)])

    def fingerprints() -> dict[str, str]:
        dm = module([TaskSpec("t", "e", str(path))], tokenizer_dir)
        dm.setup()
        return {split: dm.fingerprint("t", split) for split in ("train", "val", "eval")}

    first = fingerprints()
    assert first == fingerprints()
    assert first["val"] == first["eval"] != first["train"]
    assert len(first["train"]) == 32 and int(first["train"], 16) >= 0
    write_jsonl(path, [{"text": t.replace("sample", "sampl3")} for t in texts("t", 12)])
    changed = fingerprints()
    assert changed["train"] != first["train"] and changed["val"] != first["val"]


# ------------------------------------------------------------------------------------------- text shaping
def test_template_over_several_fields(tmp_path, tokenizer_dir):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "unused": [i]} for i in range(8)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    task = TaskSpec("qa", "e", str(path), template="Question: {question}\nAnswer: {answer}")
    dm = module([task], tokenizer_dir, samples_per_task=5, eval_samples_per_task=3)
    dm.check(["e"])
    dm.setup()
    expected = {f"Question: What is {i} + {i}?\nAnswer: {2 * i}" for i in range(8)}
    assert set(decode_rows(dm, "qa", "train") + decode_rows(dm, "qa", "val")) == expected

    broken = TaskSpec("qa", "e", str(path), template="Q: {question} A: {solution}")
    with pytest.raises(
        ExpertMergeError, match=r"Task 'qa'.*no column 'solution'.*data\.tasks\[0\]\.template"
    ):
        module([broken], tokenizer_dir).check(["e"])
    positional = TaskSpec("qa", "e", str(path), template="Q: {}")
    with pytest.raises(ExpertMergeError, match=r"Task 'qa'.*template` is not a valid format string"):
        module([positional], tokenizer_dir).check()


def test_chat_template_with_a_response_field_and_with_a_messages_column(tmp_path, tokenizer_dir):
    prompts = write_jsonl(
        tmp_path / "chat.jsonl", [{"prompt": f"ping {i}", "reply": f"pong {i}"} for i in range(4)]
    )
    task = TaskSpec(
        "chat", "e", str(prompts), text_field="prompt", chat_template=True, response_field="reply"
    )
    dm = module([task], tokenizer_dir, samples_per_task=3, eval_samples_per_task=1)
    dm.setup()
    rendered = decode_rows(dm, "chat", "train", skip_special=False) + decode_rows(dm, "chat", "val", False)
    # The chat text carries its own <s>: no second one from add_special_tokens.
    assert sorted(rendered) == [f"<s>user: ping {i}</s><s>assistant: pong {i}</s>" for i in range(4)]

    prompt_only = TaskSpec("chat", "e", str(prompts), text_field="prompt", chat_template=True)
    dm = module([prompt_only], tokenizer_dir, samples_per_task=3, eval_samples_per_task=1)
    dm.setup()
    assert sorted(decode_rows(dm, "chat", "train", False) + decode_rows(dm, "chat", "val", False)) == [
        f"<s>user: ping {i}</s><s>assistant:" for i in range(4)
    ]

    conversations = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(4)
    ]
    conversations_file = write_jsonl(tmp_path / "conv.jsonl", conversations)
    messages = TaskSpec("conv", "e", str(conversations_file), chat_template=True)
    dm = module([messages], tokenizer_dir, samples_per_task=3, eval_samples_per_task=1)
    dm.check(["e"])  # a messages column stands in for text_field
    dm.setup()
    assert sorted(decode_rows(dm, "conv", "train", False) + decode_rows(dm, "conv", "val", False)) == [
        f"<s>user: q{i}</s><s>assistant: a{i}</s>" for i in range(4)
    ]


def test_chat_template_needs_a_tokenizer_that_has_one(tmp_path, plain_tokenizer_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": t} for t in texts("c", 6)])
    dm = module([TaskSpec("chat", "e", str(path), chat_template=True)], plain_tokenizer_dir)
    with pytest.raises(ExpertMergeError, match=r"Task 'chat'.*chat_template: true.*no chat template"):
        dm.setup()


# ------------------------------------------------------------------------------------------- file formats
def _write_format(folder: Path, kind: str, rows: list[str]) -> str:
    import datasets

    if kind == "jsonl":
        return str(write_jsonl(folder / "data.jsonl", [{"text": t, "n": i} for i, t in enumerate(rows)]))
    if kind == "json":
        (folder / "data.json").write_text(json.dumps([{"text": t} for t in rows], indent=2), encoding="utf-8")
        return str(folder / "data.json")
    if kind == "txt":
        (folder / "data.txt").write_text("\n\n".join(rows) + "\n", encoding="utf-8")
        return str(folder / "data.txt")
    if kind == "csv":
        datasets.Dataset.from_dict({"id": list(range(len(rows))), "text": rows}).to_csv(folder / "data.csv")
        return str(folder / "data.csv")
    if kind == "parquet":
        datasets.Dataset.from_dict({"text": rows}).to_parquet(folder / "data.parquet")
        return str(folder / "data.parquet")
    if kind == "saved":
        datasets.Dataset.from_dict({"text": rows}).save_to_disk(folder / "saved")
        return str(folder / "saved")
    if kind == "saved_dict":
        splits = {"train": rows, "test": ["wrong split text"] * 2}
        datasets.DatasetDict(
            {k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}
        ).save_to_disk(folder / "saved_dict")
        return str(folder / "saved_dict")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "txt", "csv", "parquet", "saved", "saved_dict"])
def test_each_file_format_loads_its_texts(tmp_path, tokenizer_dir, kind):
    # Multi-line texts check that a .txt paragraph keeps its inner line breaks.
    rows = [f"{kind} text number {i}\nsecond line {i}" for i in range(9)]
    source = _write_format(tmp_path, kind, rows)
    dm = module([TaskSpec("t", "e", source)], tokenizer_dir, samples_per_task=6, eval_samples_per_task=3)
    dm.check(["e"])
    dm.setup()
    assert set(decode_rows(dm, "t", "train") + decode_rows(dm, "t", "val")) == set(rows)


def test_globs_and_several_sources_are_pooled(tmp_path, tokenizer_dir):
    (tmp_path / "shards").mkdir()
    for shard in range(3):
        write_jsonl(tmp_path / "shards" / f"part{shard}.jsonl", [{"text": t} for t in texts(f"s{shard}", 4)])
    extra = _write_format(tmp_path, "csv", texts("csv", 4))
    task = TaskSpec("t", "e", [str(tmp_path / "shards" / "*.jsonl"), extra])
    dm = module([task], tokenizer_dir, samples_per_task=12, eval_samples_per_task=4)
    dm.check(["e"])
    dm.setup()
    pooled = decode_rows(dm, "t", "train") + decode_rows(dm, "t", "val")
    assert sorted(pooled) == sorted(texts("s0", 4) + texts("s1", 4) + texts("s2", 4) + texts("csv", 4))


def test_relative_paths_resolve_from_the_current_directory(tmp_path, tokenizer_dir, monkeypatch):
    write_jsonl(tmp_path / "rel.jsonl", [{"text": t} for t in texts("r", 5)])
    monkeypatch.chdir(tmp_path)
    dm = module([TaskSpec("t", "e", "rel.jsonl")], tokenizer_dir, samples_per_task=4, eval_samples_per_task=1)
    dm.check(["e"])
    dm.setup()
    assert dm.task_samples("t", "train").input_ids.shape[0] == 4


def test_hub_ids_are_passed_to_load_dataset(monkeypatch, tokenizer_dir):
    import datasets

    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs.get("split")))
        return datasets.Dataset.from_dict({"body": texts("hub", 5)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = TaskSpec("hub", "e", "someone/some-corpus", text_field="body", split="validation")
    dm = module([task], tokenizer_dir, samples_per_task=4, eval_samples_per_task=1)
    dm.check(["e"])  # hub sources are only read at setup
    assert calls == []
    dm.setup()
    assert calls == [("someone/some-corpus", "validation")]
    assert sorted(decode_rows(dm, "hub", "train") + decode_rows(dm, "hub", "val")) == texts("hub", 5)


# ------------------------------------------------------------------------------------------- shipped corpora
def test_shipped_corpora_load_from_any_directory(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_source("corpora://prose.jsonl") == str(CORPORA_DIR / "prose.jsonl")
    tasks = [
        TaskSpec("math", "m", "corpora://math_word_problems.jsonl", template="{question}"),
        TaskSpec("code", "c", "corpora://python_code.jsonl"),
        TaskSpec("prose", "p", ["corpora://prose.jsonl"]),
        TaskSpec("math_fr", "f", "corpora://math_word_problems_fr.jsonl"),
    ]
    dm = module(tasks, tokenizer_dir, samples_per_task=4, eval_samples_per_task=2, max_length=32)
    dm.check(["m", "c", "p", "f"])
    dm.setup()
    for task in dm.task_names:
        assert dm.task_samples(task, "train").input_ids.shape == (4, 32)  # every shipped text is > 32 bytes
    readme = (CORPORA_DIR / "README.md").read_text(encoding="utf-8")
    for name in SHIPPED:
        lines = (CORPORA_DIR / name).read_text(encoding="utf-8").splitlines()
        assert len(lines) == 300 and all(json.loads(line)["text"].strip() for line in lines)
        assert name in readme
    with pytest.raises(ExpertMergeError, match=r"not a shipped corpus.*corpora://prose\.jsonl"):
        module([TaskSpec("t", "e", "corpora://poems.jsonl")], tokenizer_dir).check()


# ------------------------------------------------------------------------------------------- errors
def test_missing_file_names_task_file_and_key(tmp_path, tokenizer_dir):
    missing = tmp_path / "nowhere" / "math.jsonl"
    dm = module([TaskSpec("math", "e", str(missing))], tokenizer_dir)
    with pytest.raises(ExpertMergeError) as error:
        dm.check(["e"])
    message = str(error.value)
    assert "Task 'math'" in message and str(missing) in message and "data.tasks[0].sources" in message
    assert "does not exist" in message and "Fix the path" in message
    with pytest.raises(ExpertMergeError, match=r"glob '.*\*\.jsonl'.*matches no file"):
        module([TaskSpec("math", "e", str(tmp_path / "*.jsonl"))], tokenizer_dir).check()


def test_missing_field_names_task_file_column_and_key(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"body": t} for t in texts("b", 5)])
    dm = module([TaskSpec("prose", "e", str(path))], tokenizer_dir)
    with pytest.raises(ExpertMergeError) as error:
        dm.check(["e"])
    message = str(error.value)
    for part in ("Task 'prose'", str(path), "no column 'text'", "data.tasks[0].text_field", "body"):
        assert part in message
    # The same mistake in a saved dataset folder, and found by setup() too (it runs the same checks first).
    saved = _write_format(tmp_path, "saved", texts("s", 5))
    with pytest.raises(ExpertMergeError, match=r"Task 'prose'.*no column 'content'.*text_field"):
        module([TaskSpec("prose", "e", saved, text_field="content")], tokenizer_dir).check()
    with pytest.raises(ExpertMergeError, match=r"Task 'prose'.*no column 'text'"):
        module([TaskSpec("prose", "e", str(path))], tokenizer_dir).setup()


def test_empty_task_names_the_task_and_its_files(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": t} for t in ["", " ", "ab", None]])
    dm = module([TaskSpec("ghost", "e", str(path))], tokenizer_dir)
    dm.check(["e"])  # columns are fine; emptiness shows only once the text is tokenized
    with pytest.raises(ExpertMergeError) as error:
        dm.setup()
    message = str(error.value)
    assert "Task 'ghost' has 0 usable samples" in message and str(path) in message
    assert "data.tasks[0].min_tokens" in message


def test_unknown_expert_names_the_task_the_expert_and_the_known_ones(three_tasks, tokenizer_dir):
    dm = module(three_tasks, tokenizer_dir)
    with pytest.raises(ExpertMergeError) as error:
        dm.check(["math_expert", "code_expert"])
    message = str(error.value)
    assert "Task 'prose'" in message and "'prose_expert'" in message and "data.tasks[2].expert" in message
    assert "math_expert, code_expert" in message


def test_bad_extension_and_folders_that_are_not_datasets(tmp_path, tokenizer_dir):
    sheet = tmp_path / "data.xlsx"
    sheet.write_bytes(b"not really a spreadsheet")
    with pytest.raises(ExpertMergeError) as error:
        module([TaskSpec("sheet", "e", str(sheet))], tokenizer_dir).check()
    message = str(error.value)
    assert "Task 'sheet'" in message and str(sheet) in message and "unsupported type" in message
    assert ".jsonl" in message and ".parquet" in message
    # A missing file with a known non-data suffix is a wrong path, not a hub dataset id.
    with pytest.raises(ExpertMergeError, match=r"Task 'sheet'.*'notes\.tsv'.*does not exist"):
        module([TaskSpec("sheet", "e", "notes.tsv")], tokenizer_dir).check()
    (tmp_path / "folder").mkdir()
    with pytest.raises(ExpertMergeError, match=r"Task 'dir'.*is a folder but not a `datasets.save_to_disk`"):
        module([TaskSpec("dir", "e", str(tmp_path / "folder"))], tokenizer_dir).check()
    saved = _write_format(tmp_path, "saved_dict", texts("s", 5))
    with pytest.raises(ExpertMergeError, match=r"Task 'dir'.*has no split 'dev'.*train, test"):
        module([TaskSpec("dir", "e", saved, split="dev")], tokenizer_dir).check()


def test_settings_errors(three_tasks, tokenizer_dir, tmp_path):
    with pytest.raises(ExpertMergeError, match="No calibration tasks"):
        module([], tokenizer_dir).check()
    with pytest.raises(ExpertMergeError, match=r"`data.batch_size` is 0"):
        module(three_tasks, tokenizer_dir, batch_size=0).check()
    duplicate = [three_tasks[0], TaskSpec("math", "x", three_tasks[1].sources)]
    with pytest.raises(ExpertMergeError, match=r"Duplicate task name 'math'.*tasks\[0\].*tasks\[1\]"):
        module(duplicate, tokenizer_dir).check()
    too_long = [TaskSpec("math", "e", three_tasks[0].sources, min_tokens=100)]
    with pytest.raises(
        ExpertMergeError, match=r"tasks\[0\]\.min_tokens` of task 'math' is 100.*max_length` \(64\)"
    ):
        module(too_long, tokenizer_dir).check()
    with pytest.raises(ExpertMergeError, match=r"Task 'math' has no sources"):
        module([TaskSpec("math", "e")], tokenizer_dir).check()
    with pytest.raises(ExpertMergeError, match=r"No tokenizer.*data\.tokenizer"):
        CalibrationDataModule(three_tasks).setup()
    (tmp_path / "no_tokenizer_here").mkdir()
    with pytest.raises(ExpertMergeError, match=r"Cannot load the tokenizer"):
        module(three_tasks, tmp_path / "no_tokenizer_here").setup()


# ------------------------------------------------------------------------------------------- configuration
def test_built_from_a_yaml_config_with_tasks_as_dicts(three_tasks, tokenizer_dir):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CalibrationDataModule, "data")
    config = {
        "data": {
            "tokenizer": str(tokenizer_dir),
            "samples_per_task": 5,
            "batch_size": 2,
            "tasks": [
                {"name": "math", "expert": "m", "sources": three_tasks[0].sources[0]},
                {"name": "code", "expert": "c", "sources": three_tasks[1].sources, "template": "# {text}"},
            ],
        }
    }
    parsed = parser.parse_object(config)
    dm = parser.instantiate_classes(parsed)["data"]
    assert isinstance(dm, CalibrationDataModule)
    assert all(isinstance(task, TaskSpec) for task in dm.tasks)
    assert dm.tasks[0].sources == three_tasks[0].sources  # a single source string becomes a list
    dm.setup()
    assert dm.task_samples("code", "train").input_ids.shape[0] == 5
    assert all(text.startswith("# code sample") for text in decode_rows(dm, "code", "train"))
    # Plain dicts work without jsonargparse too.
    assert CalibrationDataModule([{"name": "x", "expert": "y", "sources": "a.jsonl"}]).tasks[0].sources == [
        "a.jsonl"
    ]


def test_round_batches_hold_one_batch_of_every_task_and_shard_by_round() -> None:
    from calib_data.datamodule import BalancedTaskBatchSampler

    sizes, offsets = [5, 9, 4], [0, 5, 14]
    single = list(BalancedTaskBatchSampler(sizes, 4, seed=3, offsets=offsets))
    rounds = list(BalancedTaskBatchSampler(sizes, 4, seed=3, offsets=offsets, rounds=True))
    assert len(rounds) == 3 and rounds == [sum(single[i : i + 3], []) for i in range(0, 9, 3)]
    for round_rows in rounds:  # every task appears in every round
        assert {0, 1, 2} == {
            next(t for t in range(3) if offsets[t] <= r < offsets[t] + sizes[t]) for r in round_rows
        }
    ranks = [
        list(BalancedTaskBatchSampler(sizes, 4, seed=3, offsets=offsets, rounds=True, rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert ranks[0] == [rounds[0], rounds[2]] and ranks[1] == [rounds[1], rounds[0]]  # padded by wrapping


# ------------------------------------------------------------------------------------------- bad input
def _empty_source(folder: Path, kind: str) -> Path:
    import datasets

    path = folder / {"jsonl_blank": "data.jsonl", "json_array": "data.json", "csv_header": "data.csv"}.get(
        kind, f"data.{kind}"
    )
    if kind == "parquet":
        datasets.Dataset.from_dict({"text": []}).to_parquet(path)
    else:
        contents = {"jsonl_blank": "\n  \n", "json_array": "[]", "csv_header": "id,text\n", "txt": " \n\n"}
        path.write_text(contents.get(kind, ""), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "kind", ["jsonl", "jsonl_blank", "json", "json_array", "csv", "csv_header", "parquet", "txt"]
)
def test_empty_source_files_are_refused_before_loading(tmp_path, tokenizer_dir, kind):
    path = _empty_source(tmp_path, kind)
    dm = module([TaskSpec("math", "e", str(path))], tokenizer_dir)
    with pytest.raises(ExpertMergeError) as error:
        dm.check(["e"])
    message = str(error.value)
    assert "Task 'math'" in message and f"file '{path}'" in message and "`data.tasks[0].sources`" in message
    expected = "but no rows" if kind in ("csv_header", "parquet") else "is empty"
    assert expected in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "contents", "expected"),
    [
        (
            "late.jsonl",
            '{"text": "one"}\n{"text": "two"}\n{"text": three}\n',
            "not valid JSON Lines: line 3: Expecting value",
        ),
        ("prose.jsonl", "just some prose\n", "not valid JSON or JSON Lines: line 1 column 1"),
        (
            "doc.json",
            '[\n  {"text": "a"},\n  {"text": b}\n]\n',
            "not valid JSON or JSON Lines: line 3 column 12",
        ),
        ("lists.jsonl", '{"text": "a"}\n["text", "b"]\n', "line 2 holds a JSON list, not an object"),
        ("numbers.json", "[1, 2, 3]", "holds a JSON int as record 1, not an object"),
        ("scalar.json", '"text"', "holds a single JSON str, not rows"),
    ],
)
def test_a_file_that_is_not_json_records_names_the_line(tmp_path, tokenizer_dir, name, contents, expected):
    path = tmp_path / name
    path.write_text(contents, encoding="utf-8")
    with pytest.raises(ExpertMergeError) as error:
        module([TaskSpec("math", "e", str(path))], tokenizer_dir).check()
    message = str(error.value)
    assert expected in message and f"file '{path}'" in message and "`data.tasks[0].sources`" in message


def test_unreadable_parquet_and_non_utf8_files_are_named(tmp_path, tokenizer_dir):
    fake = tmp_path / "data.parquet"
    fake.write_text("this is not parquet", encoding="utf-8")
    with pytest.raises(ExpertMergeError, match=r"file '.*data\.parquet'.*is not a valid Parquet file"):
        module([TaskSpec("t", "e", str(fake))], tokenizer_dir).check()
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ExpertMergeError, match=r"file '.*latin\.txt'.*is not UTF-8 text \(byte 3\)"):
        module([TaskSpec("t", "e", str(latin))], tokenizer_dir).check()


def test_columns_are_the_union_of_the_first_rows_and_a_missing_one_lists_them(tmp_path, tokenizer_dir):
    # A first row without the text column is one row with no text, not a file without the column.
    rows = [{"id": 0}] + [{"id": i, "text": t} for i, t in enumerate(texts("u", 6), 1)]
    sparse = write_jsonl(tmp_path / "sparse.jsonl", rows)
    dm = module([TaskSpec("t", "e", str(sparse))], tokenizer_dir, samples_per_task=4, eval_samples_per_task=2)
    dm.check(["e"])
    dm.setup()
    assert sorted(decode_rows(dm, "t", "train") + decode_rows(dm, "t", "val")) == texts("u", 6)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "q"}, {"answer": "a", "question": "r"}])
    template = TaskSpec("t", "e", str(mixed), template="{question} {solution}")
    with pytest.raises(
        ExpertMergeError,
        match=r"no column 'solution' \(named by `data\.tasks\[0\]\.template`\); its columns are: question, answer\.",
    ):
        module([template], tokenizer_dir).check()


def test_a_parse_error_past_the_checked_rows_names_its_cause_at_setup(tmp_path, tokenizer_dir):
    from calib_data import sources

    path = tmp_path / "long.jsonl"
    rows = [json.dumps({"text": t}) for t in texts("l", sources._PEEK_ROWS)]
    path.write_text("\n".join([*rows, '{"text": broken}']) + "\n", encoding="utf-8")
    dm = module([TaskSpec("t", "e", str(path))], tokenizer_dir)
    dm.check()  # only the first rows are parsed up front
    with pytest.raises(ExpertMergeError) as error:
        dm.setup()
    message = str(error.value)
    # The parser's own words, not the generic "An error occurred while generating the dataset".
    assert f"cannot read {path}" in message and "JSON" in message and "generating the dataset" not in message


def test_a_missing_base_folder_is_named_as_the_model_not_the_tokenizer(three_tasks, tmp_path):
    missing = tmp_path / "models" / "base"
    with pytest.raises(ExpertMergeError) as error:
        module(three_tasks, missing).check()  # before any file is read
    message = str(error.value)
    assert f"The model folder '{missing}' does not exist" in message and "`model.base`" in message
    # A relative path that could be a hub id is tried as one, then named as a missing local folder.
    with pytest.raises(ExpertMergeError, match=r"'nowhere/base' \(`model\.base`.*is not a local folder"):
        module(three_tasks, "nowhere/base").setup()


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("samples_per_task", 0, "`data.samples_per_task` is 0; it must be at least 1"),
        ("eval_samples_per_task", 0, "`data.eval_samples_per_task` is 0; it must be at least 1"),
        ("max_length", 1, "`data.max_length` is 1; it must be at least 2"),
        ("batch_size", 0, "`data.batch_size` is 0; it must be at least 1"),
        ("batch_size", True, "`data.batch_size` is True (bool); it must be a whole number"),
        ("batch_size", 2.5, "`data.batch_size` is 2.5 (float); it must be a whole number"),
        ("num_workers", -1, "`data.num_workers` is -1; it must be at least 0"),
        ("seed", 0.5, "`data.seed` is 0.5; it must be a whole number"),
    ],
)
def test_numeric_options_are_checked_with_their_key(three_tasks, tokenizer_dir, setting, value, expected):
    with pytest.raises(ExpertMergeError) as error:
        module(three_tasks, tokenizer_dir, **{setting: value}).setup()
    assert expected in str(error.value)


def test_task_options_are_checked_with_their_key(three_tasks, tokenizer_dir):
    sources = three_tasks[0].sources
    cases = [
        (TaskSpec("math", "e", sources, min_tokens=True), "`data.tasks[0].min_tokens` is True (bool)"),
        (
            TaskSpec("math", "e", sources, min_tokens=0),
            "`data.tasks[0].min_tokens` is 0; it must be at least 1",
        ),
        (
            TaskSpec("math", "e", sources, txt_sample_by="word"),
            "`data.tasks[0].txt_sample_by` of task 'math' is 'word'",
        ),
        (TaskSpec(" ", "e", sources), "`data.tasks[0].name` is ' '"),
        (TaskSpec("math", "e", sources, text_field=""), "`data.tasks[0].text_field` of task 'math' is ''"),
    ]
    for task, expected in cases:
        with pytest.raises(ExpertMergeError) as error:
            module([task], tokenizer_dir).check()
        assert expected in str(error.value)


# ------------------------------------------------------------------------------------------- through the CLI
FIT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fit_tiny.yaml")


def _bad_fit_inputs(folder: Path, models, case: str) -> list[str]:
    """CLI overrides of the tiny-zoo fit config: conftest's tiny models (no zoo to build) and one bad input."""
    good = write_jsonl(
        folder / "good.jsonl", [{"text": f"w{4 + i} w{5 + i} w{6 + i} w{7 + i}"} for i in range(20)]
    )
    base = str(folder / "no_base") if case == "missing base" else str(models.base)
    contents = {"empty": "", "not json": "Question: 2 + 2?\n", "field-less": '{"question": "2 + 2"}\n'}
    source = good
    if case in contents:
        source = folder / "calib.jsonl"
        source.write_text(contents[case], encoding="utf-8")
    overrides = ["--model.base", base, "--model.experts", json.dumps({"arith": str(models.experts["alpha"])})]
    overrides += ["--data.tasks", f"[{{name: arith, expert: arith, sources: [{source}]}}]"]
    if case == "no held-out samples":
        overrides += ["--data.eval_samples_per_task", "0"]
    return overrides


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("empty", "calib.jsonl' (`data.tasks[0].sources`) is empty"),
        ("not json", "calib.jsonl' (`data.tasks[0].sources`) is not valid JSON or JSON Lines: line 1"),
        (
            "field-less",
            "has no column 'text' (named by `data.tasks[0].text_field`); its columns are: question",
        ),
        ("missing base", "no_base' does not exist. It is `model.base`"),
        ("no held-out samples", "`data.eval_samples_per_task` is 0; it must be at least 1"),
    ],
)
def test_fit_reports_bad_calibration_input_in_one_line(tiny_models, tmp_path, capsys, case, expected):
    from expertmerge.cli import main

    out = tmp_path / "never"
    code = main(
        [
            "fit",
            "--config",
            FIT_CONFIG,
            "--export.output_dir",
            str(out),
            "--trainer.default_root_dir",
            str(tmp_path / "logs"),
            *_bad_fit_inputs(tmp_path, tiny_models, case),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1
    message = " ".join(err[err.index("error:") :].split())  # the console wraps long lines
    assert expected in message
    assert not out.exists()  # nothing exported


SECRET = "S3CRETMARK"  # stands for a password hash or key that a wrong file would put into an error message


@pytest.mark.parametrize(
    ("suffix", "contents", "expected"),
    [
        # /etc/shadow-like lines: no comma, so a CSV reader sees one "column" per line, the whole line
        (".csv", f"root:$6${SECRET}:19000:0:99999:7:::\nbin:*:19000:0:99999:7:::\n", "no column 'text'"),
        (".csv", f"root:$6${SECRET}:19000:0:99999:7:::\n", "but no rows"),
        (".csv", f"API_TOKEN={SECRET}\nOTHER=1\n", "no column 'text'"),
        (".csv", f"user,{SECRET}\nroot,x,0,0\n", "row 2 has 4 fields but the header row has 2"),
        (".jsonl", f"root:$6${SECRET}:19000:0:99999:7:::\n", "not valid JSON or JSON Lines: line 1"),
        (".json", f'["{SECRET}"]', "holds a JSON str as record 1"),
        (".parquet", f"root:$6${SECRET}:19000:0:99999:7:::\n", "not a valid Parquet file"),
    ],
)
def test_a_file_that_is_not_what_its_suffix_says_is_never_echoed(
    tmp_path, tokenizer_dir, suffix, contents, expected
):
    secret = tmp_path / "shadow"
    secret.write_text(contents, encoding="utf-8")
    link = tmp_path / f"data{suffix}"
    link.symlink_to(secret)
    with pytest.raises(ExpertMergeError) as error:
        module([TaskSpec("t", "e", str(link))], tokenizer_dir).check(["e"])
    message = str(error.value)
    assert expected in message and f"file '{link}'" in message
    assert SECRET not in message and "root:" not in message and "API_TOKEN" not in message


def test_columns_that_look_like_names_are_still_listed_next_to_hidden_ones(tmp_path, tokenizer_dir):
    path = tmp_path / "data.csv"
    path.write_text(f"id,body,x:{SECRET}:y\n1,hello,z\n", encoding="utf-8")
    with pytest.raises(ExpertMergeError) as error:
        module([TaskSpec("t", "e", str(path))], tokenizer_dir).check(["e"])
    message = str(error.value)
    assert "its columns are: id, body and 1 more that do not look like column names (not shown;" in message
    assert SECRET not in message
