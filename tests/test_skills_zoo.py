"""Zoo C (`skills`): disjoint synthetic splits, answers the scorers can check, registration, and a tiny build.

The real zoo (a GGUF conversion and three CPU fine-tunes) is never built here; the build runs on a tiny
stand-in base whose tokenizer has a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertmerge.accuracy import score_one
from expertmerge.errors import ExpertMergeError
from expertmerge.zoo_registry import register_zoo, unregister_zoo, zoo_builder
from expertmerge_zoos import skills
from expertmerge_zoos.corpora import read_jsonl
from expertmerge_zoos.skills import (
    GENERAL_TEMPLATES,
    SKILLS,
    SkillRecipe,
    build_skills_zoo,
    check_skill_splits,
    encode_answers,
    general_records,
    skill_records,
    template_splits,
)

SIZES = {"train": 60, "validation": 8, "calib": 12, "heldout": 12}
CHAT = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> {% endif %}"


@pytest.mark.parametrize("skill", SKILLS, ids=lambda s: s.name)
def test_skill_splits_are_disjoint_by_prompt_template_and_values(skill) -> None:
    splits = skill_records(skill, seed=0, sizes=SIZES)
    assert {s: len(rows) for s, rows in splits.items()} == SIZES
    for field in ("prompt", "template", "values"):
        seen = [{r[field] for r in rows} for rows in splits.values()]
        assert sum(len(s) for s in seen) == len(set().union(*seen)), field
    assert len({r["template"] for r in splits["heldout"]}) <= 3  # its own templates only
    assert all("answer" not in r for r in splits["calib"])  # prompts only: what a user has
    assert all(r["answer"] for split in ("train", "validation", "heldout") for r in splits[split])
    assert skill_records(skill, seed=0, sizes=SIZES) == splits  # seeded
    assert skill_records(skill, seed=1, sizes=SIZES) != splits
    check_skill_splits(splits, skill.name)


def test_template_splits_partition_the_templates() -> None:
    parts = template_splits("units", 12, seed=0)
    assert {s: len(t) for s, t in parts.items()} == {"heldout": 3, "calib": 3, "validation": 2, "train": 4}
    assert sorted(i for t in parts.values() for i in t) == list(range(12))


def test_check_skill_splits_names_a_shared_template() -> None:
    rows = {"train": [{"prompt": "a", "template": "t1", "values": "1"}],
            "heldout": [{"prompt": "b", "template": "t1", "values": "2"}]}  # fmt: skip
    with pytest.raises(ExpertMergeError, match="templates overlap"):
        check_skill_splits(rows, "x")


def test_general_prompts_split_by_template_and_topic() -> None:
    splits = general_records(0, {"calib": 20, "heldout": 10})
    assert [len(splits[s]) for s in ("calib", "heldout")] == [20, 10]
    check_skill_splits(splits, "general")
    templates = {s: {r["template"] for r in rows} for s, rows in splits.items()}
    assert len(templates["calib"] | templates["heldout"]) <= len(GENERAL_TEMPLATES)


@pytest.mark.parametrize("skill", SKILLS, ids=lambda s: s.name)
def test_reference_answers_score_one_and_wrong_answers_zero(skill) -> None:
    records = skill_records(skill, seed=0, sizes=SIZES)["heldout"]
    for record, other in zip(records, records[1:] + records[:1], strict=True):
        assert score_one(skill.scorer, record["answer"], record["answer"], None)
        assert score_one(skill.scorer, f"{record['answer']}.", record["answer"], None)
        if other["answer"] != record["answer"]:
            assert not score_one(skill.scorer, other["answer"], record["answer"], None)
    first = records[0]["answer"]
    wrong = {"units": lambda a: str(int(a) + 1), "dates": lambda a: a.replace("-", "/"), "caps": str.title}
    assert not score_one(skill.scorer, wrong[skill.name](first), first, None)


def test_the_values_follow_the_skill() -> None:
    units, dates, caps = (skill_records(s, 0, SIZES)["train"][0] for s in SKILLS)
    value, source = units["values"].split(":")[1], units["values"].split(":")[0]
    factor = {u[0]: u[2] for u in skills._UNITS}[source]
    assert units["answer"] == str(int(value) * factor) and value in units["prompt"]
    year, month, day = (int(v) for v in dates["values"].split("-"))
    assert (
        dates["answer"] == f"{year:04d}-{month:02d}-{day:02d}"
        and skills._MONTHS[month - 1] in dates["prompt"]
    )
    assert caps["answer"] == caps["values"].upper() and caps["values"] in caps["prompt"]


def _tiny_chat_base(folder: Path) -> None:
    from conftest import save_model, tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT
    save_model(tiny_llama(seed=0, max_position_embeddings=128), folder, tokenizer=tokenizer)


def test_loss_mask_covers_the_answer_and_its_end(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    _tiny_chat_base(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    ids, mask, loss_mask = encode_answers(tokenizer, [{"prompt": "w4 w5", "answer": "w6 w7"},
                                                      {"prompt": "w4", "answer": "w9"}])  # fmt: skip
    # "<s> w4 w5 </s> <s> " then the answer and EOS: 5 prompt tokens, 2 answer tokens, 1 EOS
    assert ids[0].tolist() == [1, 4, 5, 2, 1, 6, 7, 2]
    assert loss_mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert loss_mask[1].tolist() == [0, 0, 0, 0, 1, 1, 0, 0] and mask[1].tolist() == [1] * 6 + [0, 0]


def test_tiny_build_writes_the_splits_experts_and_curves(tmp_path: Path) -> None:
    recipe = SkillRecipe(
        train_samples=16, validation_samples=4, calib_samples=4, heldout_samples=4, general_calib_samples=4,
        general_heldout_samples=4, max_steps=3, eval_every=1, patience=1, max_new_tokens=4,
    )  # fmt: skip
    out = build_skills_zoo(tmp_path / "zoo", recipe=recipe, make_base=_tiny_chat_base)
    manifest = json.loads((out / "zoo.json").read_text())
    assert list(manifest["tasks"]) == ["units", "dates", "caps"] and manifest["general"]["expert"] == "base"
    for name, task in manifest["tasks"].items():
        assert (out / task["expert"] / "model.safetensors").is_file()
        assert [len(read_jsonl(out / task[s])) for s in ("train", "validation", "calib", "heldout")] == [
            16,
            4,
            4,
            4,
        ]
        curve = manifest["training"][name]["validation_curve"]
        assert curve[0][0] == 0 and 1 <= len(manifest["training"][name]["train_losses"]) <= 3
        # an untrained stand-in never answers right: no rise, so training stops after `patience` evaluations
        assert [step for step, _ in curve] == [0, 1] and manifest["training"][name]["kept_step"] == 0
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base")
    expert = AutoModelForCausalLM.from_pretrained(out / "experts" / "units")
    # the kept weights are the best evaluation's: step 0, the base itself
    assert all(
        torch.equal(a, b)
        for a, b in zip(base.state_dict().values(), expert.state_dict().values(), strict=True)
    )
    assert len(read_jsonl(out / manifest["general"]["heldout"])) == 4


def test_the_skills_zoo_registers() -> None:
    register_zoo("skills", skills.ZOO)
    try:
        assert zoo_builder("skills") is skills.ZOO and skills.ZOO.version == 1
    finally:
        unregister_zoo("skills")
