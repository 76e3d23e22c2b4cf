"""Symphony-MoE on the diffinit zoo (Llamas pretrained from different random inits): alignment makes the MoE work,
the export loads and generates, and incompatible experts fail before any work, naming the expert and the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.zoo_registry import ensure_zoo, register_zoo
from expertmerge_zoos.diffinit import ZOO

register_zoo("diffinit", ZOO)  # entry points appear only after `pip install -e .`; tests do not need that

TASKS = ("math", "code")


def _config(tmp: Path | None = None, **overrides) -> dict:
    config = {
        "experts": {task: f"zoo://diffinit/experts/{task}" for task in TASKS},
        "data": {
            "tasks": [
                {"name": task, "expert": task, "sources": [f"zoo://diffinit/data/{task}_calib.jsonl"]}
                for task in TASKS
            ],
            "samples_per_task": 24,
            "eval_samples_per_task": 16,
            "max_length": 64,
            "batch_size": 8,
        },
        "moe": {"router_tuning_steps": 0},
    }
    if tmp is not None:
        config["output_dir"] = str(tmp / "out")
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def run():
    from expertmerge.symphony_run import load_symphony_config, prepare

    ensure_zoo("diffinit")
    from lightning_modules.trainer import plain_trainers

    return prepare(load_symphony_config(_config()), progress=False, trainer_factory=plain_trainers())


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


ROUTER_STEPS = 20  # router tuning as the product ships it (configs/symphony_diffinit.yaml tunes 30 steps)


def test_moe_with_alignment_beats_moe_without_which_beats_the_dense_average(run):
    run.pool.alignments = {}
    dense_average = _mean(run.score_dense())
    unaligned = _mean(run.score_moe(tuning_steps=ROUTER_STEPS)["tuned"])
    run.align(residual=True, ffn=True)
    aligned = _mean(run.score_moe(tuning_steps=ROUTER_STEPS)["tuned"])
    report = run.reports["code"]
    assert report["residual_cosine_after"] > report["residual_cosine_before"] + 0.5
    assert report["ffn_correlation_after"] > report["ffn_correlation_before"] + 0.2
    # Held-out KL of each task to its own expert, mean over tasks, routers tuned (measured 0.45 < 0.67 <
    # 0.89). With the routers as initialised the unaligned MoE's margin over the dense average is thin here
    # (0.81) and with three experts it is worse than the average (benchmarks/SYMPHONY.md).
    assert aligned < 0.8 * unaligned, (aligned, unaligned, dense_average)
    assert unaligned < 0.85 * dense_average, (aligned, unaligned, dense_average)


def test_learned_backbone_beats_the_slerp_backbone(run):
    """Our learned merge of the aligned experts (oracle routing) against the paper's layer-aware SLERP."""
    from expertmerge.symphony_run import BackboneOptions

    run.align(residual=True, ffn=True)
    slerp = _mean(run.score_moe()["init"])
    learned = _mean(run.score_moe(BackboneOptions(method="learned", learned={"steps": 30}))["init"])
    fit = run.backbone_report
    assert fit["steps"] == 30 and fit["learned_tensors"] == 2 * 4 + 2  # q, k, v, o of 2 layers; embed, head
    assert fit["loss_last"] < fit["loss_first"]
    assert learned < 0.9 * slerp, (learned, slerp)  # measured 0.39 vs 0.47


def test_symphony_command_writes_a_moe_that_transformers_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM

    from expertmerge.cli import main

    config = tmp_path / "symphony.yaml"
    learned = {"method": "learned", "learned": {"steps": 2}}
    config.write_text(json.dumps(_config(tmp_path, moe={"router_tuning_steps": 3}, backbone=learned)))
    assert main(["symphony", "--config", str(config), "--no-progress"]) == 0
    out = tmp_path / "out"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.num_local_experts == 2
    ids = torch.tensor([[1, 40, 41, 42]])
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)
    card = (out / "README.md").read_text()
    assert "symphony_reference" in card and "learned" in card


def test_dense_option_writes_a_dense_llama(tmp_path):
    from expertmerge.symphony_run import run_symphony

    summary = run_symphony(_config(tmp_path, output="dense"), progress=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary.output)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(0.0 < kl < 10.0 for kl in summary.heldout_kl.values())


def _expert_copy(tmp: Path, name: str) -> Path:
    return Path(shutil.copytree(ensure_zoo("diffinit") / "experts" / name, tmp / name))


def test_expert_with_other_shapes_fails_before_work_naming_expert_and_tensor(tmp_path):
    from transformers import LlamaForCausalLM

    from expertmerge.symphony_run import run_symphony

    folder = _expert_copy(tmp_path, "code")
    config = LlamaForCausalLM.from_pretrained(folder).config
    config.intermediate_size = 96
    LlamaForCausalLM(config).save_pretrained(folder)
    experts = {"math": "zoo://diffinit/experts/math", "code": str(folder)}
    with pytest.raises(ExpertMergeError, match=r"expert 'code'.*mlp\.(down|gate|up)_proj\.weight.*shape"):
        run_symphony(_config(tmp_path, experts=experts), progress=False)
    assert not (tmp_path / "out").exists()


def test_expert_with_other_tokenizer_fails_naming_expert_and_file(tmp_path):
    from expertmerge.symphony_run import run_symphony

    folder = _expert_copy(tmp_path, "code")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, other ids
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    experts = {"math": "zoo://diffinit/experts/math", "code": str(folder)}
    with pytest.raises(ExpertMergeError, match=r"expert 'code'.*different tokenizer.*tokenizer\.json"):
        run_symphony(_config(tmp_path, experts=experts), progress=False)


def test_config_without_base_names_the_reference_and_refuses_a_base(tmp_path):
    from expertmerge.symphony_run import load_symphony_config

    with pytest.raises(ExpertMergeError, match="takes no `base`"):
        load_symphony_config(_config(base="zoo://tiny/base"))
    with pytest.raises(ExpertMergeError, match="reference 'nope' is not one of the experts"):
        from expertmerge.symphony import SymphonyPool

        SymphonyPool(_config()["experts"], "nope")
    with pytest.raises(ExpertMergeError, match="`moe.top_k`"):
        load_symphony_config(_config(moe={"top_k": "many"}))


def test_forced_to_one_expert_the_aligned_moe_reproduces_that_expert(run, tmp_path):
    """The proof of the export: with the backbone taken from expert k (t = 0 or 1 of two experts) and routing
    forced to expert k, the MoE of the aligned experts computes expert k's original logits."""
    from transformers import AutoModelForCausalLM

    from expertmerge.symphony import backbone, router_rows, write_moe
    from tests.moe_routing import forced_routing

    run.align(residual=True, ffn=True, heads=True)
    samples = run.datamodule.task_samples("code", "eval")
    ids, mask = samples.input_ids[:4], samples.attention_mask[:4]
    for index, (expert, t) in enumerate((("math", 0.0), ("code", 1.0))):
        shared = backbone(run.pool, t=t)
        rows = router_rows(run.pool, shared, run.batches_per_expert(), "random")
        write_moe(run.pool, tmp_path / expert, shared, rows)
        moe = AutoModelForCausalLM.from_pretrained(tmp_path / expert, dtype=torch.float32).eval()
        original = AutoModelForCausalLM.from_pretrained(run.pool.expert_dirs[expert], dtype=torch.float32)
        with torch.no_grad(), forced_routing(moe, index):
            got = moe(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        want = original.eval()(input_ids=ids, attention_mask=mask).logits[mask.bool()].detach()
        assert (got - want).abs().max() <= 1e-4, expert


def _random_qwen_expert(family: str, seed: int, folder: Path) -> Path:
    """A tiny Qwen2 / Qwen3 of its own random init (no base shared with the other), with the diffinit
    tokenizer: the format follows the experts' family."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from tests.conftest import tiny_model_settings

    tokenizer = AutoTokenizer.from_pretrained(ensure_zoo("diffinit") / "tokenizer")
    settings = tiny_model_settings(vocab_size=len(tokenizer), max_position_embeddings=128)
    torch.manual_seed(seed)
    if family == "qwen2":  # q/k/v biases: the heads permutation moves them, the rotation leaves them
        model = Qwen2ForCausalLM(Qwen2Config(**settings))
    else:  # per-head q/k norms, head_dim * heads != hidden
        model = Qwen3ForCausalLM(Qwen3Config(**settings, head_dim=16))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("family", "architecture"), [("qwen2", "Qwen2MoeForCausalLM"), ("qwen3", "Qwen3MoeForCausalLM")]
)
def test_qwen_experts_give_a_qwen_moe_that_loads_generates_and_reproduces_an_aligned_expert(
    family, architecture, tmp_path
):
    from transformers import AutoModelForCausalLM

    from expertmerge.symphony import backbone, router_rows, write_moe
    from expertmerge.symphony_run import load_symphony_config, prepare
    from tests.moe_routing import forced_routing

    experts = {task: str(_random_qwen_expert(family, 7 + k, tmp_path / task)) for k, task in enumerate(TASKS)}
    config = _config(experts=experts)
    config["data"].update(samples_per_task=8, eval_samples_per_task=4, max_length=32)
    run = prepare(load_symphony_config(config), progress=False)
    run.align(residual=True, ffn=True, heads=True)
    shared = backbone(run.pool, t=1.0)  # the code expert's own (aligned) attention, embeddings and head
    write_moe(run.pool, tmp_path / "moe", shared, router_rows(run.pool, shared, run.batches_per_expert()))

    moe, info = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    assert type(moe).__name__ == architecture
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    moe = moe.float().eval()
    ids = torch.tensor([[1, 40, 41, 42]])
    assert moe.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0).shape == (1, 9)
    original = AutoModelForCausalLM.from_pretrained(experts["code"], dtype=torch.float32).eval()
    samples = run.datamodule.task_samples("code", "eval")
    ids, mask = samples.input_ids, samples.attention_mask
    with torch.no_grad(), forced_routing(moe, 1):
        got = moe(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        want = original(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert (got - want).abs().max() <= 1e-4
