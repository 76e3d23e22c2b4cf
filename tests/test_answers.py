"""Expert-written answers (`data.tasks[i].answers: expert`) on the tiny zoo: generation, cache, samples, losses."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FIT_TINY
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertmerge.answers import AnswerSettings, answers_generated, eos_ids, expert_answers, generate_answers
from expertmerge.cli import main

SEPARATORS = {"arith": "=", "reverse": ">"}


@pytest.fixture(scope="module")
def prompts(tiny_zoo: Path, tmp_path_factory) -> dict[str, Path]:
    """Prompt-only calibration files: each tiny calibration line cut after its last question ("... 80+11=")."""
    folder = tmp_path_factory.mktemp("prompts")
    files = {}
    for task, separator in SEPARATORS.items():
        lines = (tiny_zoo / "data" / f"{task}_calib.jsonl").read_text().splitlines()
        texts = [json.loads(line)["text"] for line in lines]
        files[task] = folder / f"{task}.jsonl"
        files[task].write_text(
            "".join(json.dumps({"text": t[: t.rindex(separator) + 1]}) + "\n" for t in texts)
        )
    return files


def _tasks(prompts: dict[str, Path], **settings) -> str:
    return json.dumps(
        [
            {"name": task, "expert": task, "sources": [str(path)], "answers": "expert", **settings}
            for task, path in prompts.items()
        ]
    )


def _prepared(prompts: dict[str, Path], *overrides: str, **settings):
    from expertmerge.cli.fit import read_fit_config

    data = ["--data.samples_per_task", "8", "--data.eval_samples_per_task", "4"]
    config = read_fit_config(FIT_TINY, ["--data.tasks", _tasks(prompts, **settings), *data, *overrides])
    config.model.run.datamodule = config.datamodule
    return config.model.run.prepare()


def test_answers_are_written_once_cached_and_cover_the_samples(prompts) -> None:
    """A second prepare writes no answer (every entry from the cache) and gets the same samples; each sample is
    its prompt followed by its expert's greedy answer, which the expert's own teacher targets (computed on
    prompt + answer) predict token by token."""
    first_count = answers_generated()
    first = _prepared(prompts, max_new_tokens=9)  # settings no other test uses: a fresh cache entry
    assert (first.calibration.answer_stats.computed, first.calibration.answer_stats.reused) == (4, 0)
    assert answers_generated() - first_count == 2 * (8 + 4)
    counted = answers_generated()
    second = _prepared(prompts, max_new_tokens=9)
    assert answers_generated() == counted
    assert (second.calibration.answer_stats.computed, second.calibration.answer_stats.reused) == (0, 4)
    assert second.calibration.teacher_stats.computed == 0  # same samples, same teacher cache keys
    datamodule, again = first.calibration.datamodule, second.calibration.datamodule
    for task in datamodule.task_names:
        for split in ("train", "eval"):
            samples, repeated = datamodule.task_samples(task, split), again.task_samples(task, split)
            for name in ("input_ids", "attention_mask", "answer_mask"):
                assert torch.equal(getattr(samples, name), getattr(repeated, name))
            prompt = datamodule.prompt_samples(task, split)
            lengths = prompt.attention_mask.sum(1)
            real = samples.attention_mask.sum(1)
            assert torch.equal(
                samples.answer_mask.sum(1), real - lengths
            )  # answer = everything after the prompt
            assert int((real - lengths).min()) >= 2  # the tiny experts answer with digits / letters, then EOS
            for row in range(samples.input_ids.shape[0]):
                assert torch.equal(
                    samples.input_ids[row, : lengths[row]], prompt.input_ids[row, : lengths[row]]
                )
                assert int(samples.input_ids[row, real[row] - 1]) == datamodule.tokenizer.eos_token_id
        targets = first.calibration.targets[(task, "train")].tensors
        samples = datamodule.task_samples(task, "train")
        assert targets["topk_indices"].shape[1] == samples.input_ids.shape[1]
        predicts = samples.answer_mask[:, 1:].bool()  # positions whose next token is an answer token
        top1 = targets["topk_indices"][:, :-1, 0].long()
        assert torch.equal(top1[predicts], samples.input_ids[:, 1:][predicts])  # greedy: the expert's argmax


def _one_by_one(model, ids: list[int], max_new: int, ends: set[int]) -> list[int]:
    """Plain greedy decoding without a cache or padding: the full forward at every step."""
    answer: list[int] = []
    with torch.no_grad():
        while len(answer) < max_new:
            logits = model(input_ids=torch.tensor([ids + answer])).logits
            answer.append(int(logits[0, -1].argmax()))
            if answer[-1] in ends:
                break
    return answer


def test_batched_left_padded_generation_equals_one_by_one_greedy(tiny_zoo, prompts) -> None:
    folder = tiny_zoo / "experts" / "arith"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lines = [json.loads(line)["text"] for line in prompts["arith"].read_text().splitlines()[:6]]
    # Prompts of several lengths: a line's fifth question is answered and ended; an earlier one is followed by
    # more questions, past the token limit.
    texts = [line if k % 2 else line.split(" ", k)[-1] for k, line in enumerate(lines)]
    encoded = [tokenizer(t).input_ids for t in texts]
    width = max(map(len, encoded))
    input_ids = torch.zeros((len(texts), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):  # right-padded, as the data module holds prompts
        input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
    ends = eos_ids(folder, tokenizer)
    assert ends == [tokenizer.eos_token_id]
    common = dict(ends=ends, pad_id=0, decode=tokenizer.decode, batch_size=4)
    written = generate_answers(model, input_ids, mask, AnswerSettings(max_new_tokens=6), **common)
    expected = [_one_by_one(model, ids, 6, set(ends)) for ids in encoded]
    assert written.tokens == expected
    assert written.ended == [answer[-1] in ends for answer in expected]
    assert any(written.ended) and not all(written.ended)  # both endings occur (6 tokens cut some)
    # A stop string ends an answer at the token that completes it.
    stopped = generate_answers(
        model, input_ids, mask, AnswerSettings(max_new_tokens=6, stop=("1",)), **common
    )
    for answer, full in zip(stopped.tokens, expected, strict=True):
        cut = next((n for n in range(1, len(full) + 1) if "1" in tokenizer.decode(full[:n])), len(full))
        assert answer == full[:cut]
    assert stopped.tokens != expected

    # Sampling is seeded: the same seed gives the same answers, another seed others.
    def sample(seed: int) -> list[list[int]]:
        settings = AnswerSettings(max_new_tokens=6, temperature=1.5, seed=seed)
        return generate_answers(model, input_ids, mask, settings, **common).tokens

    assert sample(1) == sample(1) and sample(1) != sample(2)


def test_losses_weigh_answer_positions_by_answer_weight(prompts) -> None:
    """With `answer_weight` 3 each position whose next token is an answer token counts 3 times in the KL, the
    hidden term and the text's own loss (padding never): checked by hand on one batch."""
    from expertmerge.losses import kl_to_teacher

    module = _prepared(prompts, "--model.answer_weight", "3", "--model.mu", "0.5", max_new_tokens=9)
    batch = next(iter(module.calibration.datamodule.train_dataloader()))
    ids, mask, answer = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
    task = module.task_names[int(batch["task_index"])]
    layer = module.calibration.hidden_layers[0]
    targets = module.calibration.targets[(task, "train")].rows(batch["sample_index"], ids.shape[1])
    parts = module.objective.task_losses(batch)
    with torch.no_grad():
        out = module.merged(ids, mask, output_hidden_states=True)
    predicts_answer = torch.cat([answer[:, 1:], torch.zeros_like(answer[:, :1])], dim=1).float()
    weight = mask * (1 + 2 * predicts_answer)
    assert float(weight.sum()) > float(mask.sum())  # the batch has answers
    kl = (kl_to_teacher(out.logits, targets) * weight).sum() / weight.sum()
    log_probs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    next_weight = mask[:, 1:] * weight[:, :-1]
    ce = (nll * next_weight).sum() / next_weight.sum()
    squared = (out.hidden_states[layer] - targets[f"hidden.{layer}"]).pow(2).mean(-1)
    mse = (squared * weight).sum() / weight.sum()
    torch.testing.assert_close(parts["kl"].detach(), kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["ce"].detach(), ce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["mse"].detach(), mse, rtol=1e-5, atol=1e-7)
    plain = (kl_to_teacher(out.logits, targets) * mask).sum() / mask.sum()
    assert abs(float(kl - plain)) > 1e-4  # the weight changes the term


@pytest.mark.parametrize(
    ("task_settings", "extra", "named"),
    [
        ({"answers": "gold"}, [], "answers"),
        ({"answers": "expert", "max_new_tokens": 0}, [], "data.tasks[0].max_new_tokens"),
        (
            {"answers": "expert", "chat_template": True, "response_field": "text"},
            [],
            "data.tasks[0].response_field",
        ),
        ({"temperature": 0.7}, [], "data.tasks[0].temperature"),
        ({"answers": "expert", "stop": [""]}, [], "data.tasks[0].stop"),
        ({"answers": "expert"}, ["--model.answer_weight", "0"], "model.answer_weight"),
        ({}, ["--model.answer_weight", "3"], "model.answer_weight"),
    ],
)
def test_bad_answer_options_fail_with_one_clear_error(
    prompts, tmp_path: Path, capsys, task_settings: dict, extra: list[str], named: str
) -> None:
    task = {"name": "arith", "expert": "arith", "sources": [str(prompts["arith"])], **task_settings}
    code = main(
        [
            "fit",
            "--config",
            FIT_TINY,
            "--export.output_dir",
            str(tmp_path / "never"),
            "--data.tasks",
            json.dumps([task]),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert named in err
    assert not (tmp_path / "never").exists()


def _datamodule(tiny_zoo: Path, source: Path, **settings):
    from calib_data.datamodule import CalibrationDataModule

    task = {"name": "arith", "expert": "arith", "sources": [str(source)], "answers": "expert", **settings}
    datamodule = CalibrationDataModule(
        tasks=[task], tokenizer=str(tiny_zoo / "base"), samples_per_task=8, eval_samples_per_task=2
    )
    datamodule.setup()
    return datamodule


def test_answers_that_say_nothing_or_never_end_are_counted_in_a_warning(tiny_zoo, prompts) -> None:
    from expertmerge.pool import ExpertPool

    pool = ExpertPool(tiny_zoo / "base", {"arith": tiny_zoo / "experts" / "arith"})
    # Whole calibration lines ask nothing more: the expert ends at once.
    finished = _datamodule(tiny_zoo, tiny_zoo / "data" / "arith_calib.jsonl", max_new_tokens=5)
    with pytest.warns(
        UserWarning, match=r"wrote nothing \(an end-of-text token at once\) for 10 of 10 prompts"
    ):
        _, stats = expert_answers(finished, pool)
    assert stats.counts == {"arith": {"prompts": 10, "empty": 10, "cut": 0}}
    # One new token is never enough for an answer and its EOS.
    short = _datamodule(tiny_zoo, prompts["arith"], max_new_tokens=1)
    with pytest.warns(UserWarning, match=r"10 of 10 answers by expert 'arith' ran to max_new_tokens \(1\)"):
        answers, stats = expert_answers(short, pool)
    assert stats.counts == {"arith": {"prompts": 10, "empty": 0, "cut": 10}}
    with warnings.catch_warnings():  # a healthy expert gets no warning
        warnings.simplefilter("error")
        answers, stats = expert_answers(_datamodule(tiny_zoo, prompts["arith"], max_new_tokens=8), pool)
    assert stats.counts["arith"]["empty"] == stats.counts["arith"]["cut"] == 0
    # Prompt + answer longer than data.max_length are cut there, with a count.
    short.max_length = int(short.prompt_samples("arith", "train").attention_mask.sum(1).min())
    with pytest.warns(UserWarning, match=r"Task 'arith': 8 of 8 train prompts with their answers are longer"):
        short.attach_answers({("arith", "train"): answers[("arith", "train")]})
    assert int(short.task_samples("arith", "train").answer_mask.sum()) < sum(
        len(a) for a in answers[("arith", "train")]
    )
