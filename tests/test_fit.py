"""`python -m expertmerge fit` end to end on the tiny zoo: real models, real Lightning training, real exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fit_args
from transformers import AutoModelForCausalLM

from expertmerge.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fit_tiny.yaml")


def fit(tmp: Path, name: str, *overrides: str) -> Path:
    """Run `fit` on the tiny zoo into tmp/name; returns the exported folder."""
    out = tmp / name
    code = main(fit_args(tmp, name, *overrides))
    assert code == 0
    return out


def mean_kl(scores: dict, row: str) -> float:
    return sum(task["kl"] for task in scores[row].values()) / len(scores[row])


def all_coefficients(folder: Path) -> list[float]:
    table = json.loads((folder / "coefficients.json").read_text())["coefficients"]
    return [v for per_expert in table.values() for values in per_expert.values() for v in values]


@pytest.fixture(scope="module")
def layerwise_fit(tiny_zoo, tmp_path_factory) -> Path:
    return fit(tmp_path_factory.mktemp("fit"), "layerwise")


def test_learned_merge_beats_task_arithmetic_on_held_out_kl(layerwise_fit: Path) -> None:
    scores = json.loads((layerwise_fit / "eval.json").read_text())
    learned, arithmetic = mean_kl(scores, "expert merging"), mean_kl(scores, "task arithmetic (alpha0)")
    assert learned < 0.95 * arithmetic, (learned, arithmetic)
    assert mean_kl(scores, "experts") == pytest.approx(0.0, abs=1e-6)
    values = all_coefficients(layerwise_fit)
    assert all(0.0 < v < 1.0 for v in values)
    assert max(abs(v - 0.3) for v in values) > 0.02  # the coefficients did move from alpha0


def test_exported_model_is_the_learned_merge(layerwise_fit: Path, tiny_zoo: Path) -> None:
    merged = AutoModelForCausalLM.from_pretrained(layerwise_fit, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_zoo / "base", dtype=torch.float32)
    experts = {
        name: AutoModelForCausalLM.from_pretrained(tiny_zoo / "experts" / name, dtype=torch.float32)
        for name in ("arith", "reverse", "sort")
    }
    saved = json.loads((layerwise_fit / "coefficients.json").read_text())
    merged_state, base_state = merged.state_dict(), base.state_dict()
    for name, per_expert in saved["coefficients"].items():
        expected = base_state[name].clone()
        for expert, values in per_expert.items():
            expected += values[0] * (experts[expert].state_dict()[name] - base_state[name])
        # task vectors are stored in bf16 during the fit: compare at that precision
        torch.testing.assert_close(merged_state[name], expected, atol=2e-3, rtol=0)
    # tensors without learned coefficients are task arithmetic at alpha0
    norm = "model.norm.weight"
    expected = base_state[norm] + 0.3 * sum(e.state_dict()[norm] - base_state[norm] for e in experts.values())
    torch.testing.assert_close(merged_state[norm], expected, atol=1e-5, rtol=0)
    for required in ("tokenizer.json", "README.md", "fit_config.yaml", "coefficients.png"):
        assert (layerwise_fit / required).is_file(), required


def test_fixed_tensors_base_keeps_unlearned_tensors_at_the_base(tiny_zoo: Path, tmp_path: Path) -> None:
    from conftest import LEAN_FIT

    out = fit(tmp_path, "at-base", "--model.fixed_tensors", "base", "--trainer.max_steps", "1", *LEAN_FIT)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_zoo / "base", dtype=torch.float32).state_dict()
    expert = AutoModelForCausalLM.from_pretrained(tiny_zoo / "experts" / "arith", dtype=torch.float32)
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        # the experts changed these tensors, yet the merge keeps the base's (the official code's choice)
        assert float((expert.state_dict()[name] - base[name]).abs().max()) > 1e-4, name
        torch.testing.assert_close(merged[name], base[name], atol=0, rtol=0)
    learned = json.loads((out / "coefficients.json").read_text())["coefficients"]
    assert any(float((merged[n] - base[n]).abs().max()) > 1e-4 for n in learned)


def test_second_fit_reuses_teacher_targets_and_is_deterministic(
    layerwise_fit: Path, tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    again = fit(tmp_path, "again")
    printed = capsys.readouterr().out
    assert "0 / 6" in printed  # teacher targets computed / reused: every one came from the cache
    assert all_coefficients(again) == all_coefficients(layerwise_fit)


def test_progress_bar_is_a_default_that_can_be_turned_off(tiny_zoo) -> None:
    from expertmerge.cli.fit import read_fit_config
    from lightning_modules.progress import StepProgressBar

    quiet = read_fit_config(CONFIG, ["--trainer.enable_progress_bar", "false"]).trainer
    default = read_fit_config(CONFIG).trainer
    assert quiet.progress_bar_callback is None
    assert isinstance(default.progress_bar_callback, StepProgressBar)


def test_fit_prints_steps_of_max_steps_and_no_lightning_tips(tiny_zoo, tmp_path: Path, capfd) -> None:
    fit(tmp_path, "short", "--trainer.max_steps", "2", "--export.evaluate", "false")
    printed = "".join(capfd.readouterr())
    assert "step" in printed and "2/2" in printed
    for noise in (
        "Tip:",
        "litlogger",
        "litmodels",
        "GPU available",
        "Generating train split",
        "Epoch",
        "Seed set",
        "Trainer.fit` stopped",
        "v_num",
    ):
        assert noise not in printed, noise


def _steps_shown(printed: str) -> list[int]:
    """The step counts of the step bar (or plain lines) in the order they were drawn."""
    import re

    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", printed)  # a terminal's cursor moves and colours
    return [int(n) for n in re.findall(r"\bstep\s[^\n/]*?\b(\d+)/6\b", plain)]


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_counts_optimiser_steps_forward_at_steps_per_second(
    tiny_zoo, tmp_path: Path, capfd, monkeypatch, terminal: bool
) -> None:
    """3 micro-batches per step (fit_tiny accumulates one batch per task): a bar that counted micro-batches would
    show 3/6, 6/6 ... mid-step or jump back; a log file (no terminal) gets a plain line per step of this short fit."""
    import re

    import rich

    if terminal:
        monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich then draws its live bar into the captured output
    try:
        fit(tmp_path, "steps", "--trainer.max_steps", "6", "--export.evaluate", "false")
    finally:
        monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
        rich.reconfigure()  # Lightning's bar reconfigured rich's shared console from the environment
    printed = "".join(capfd.readouterr())
    steps = _steps_shown(printed)
    assert steps and steps == sorted(steps) and steps[-1] == 6, steps
    assert "Epoch" not in printed and "it/s" not in printed
    if terminal:
        assert re.search(r"\d+\.\d (steps/s|s/step)", printed)
    else:
        lines = re.findall(r"^step (\d+)/6, \d+\.\d (?:steps/s|s/step), train/loss (\d\.\d+)", printed, re.M)
        assert [int(step) for step, _ in lines] == [1, 2, 3, 4, 5, 6]
        assert all(0 < float(loss) < 10 for _, loss in lines)


def test_resumed_fit_ends_where_an_uninterrupted_fit_ends(tiny_zoo, tmp_path: Path) -> None:
    # 12 batches per epoch: stop at an epoch boundary, as a killed run's last checkpoint would be. With the
    # task balance (its scales are measured at the start point and must come back from the checkpoint, not be
    # measured again at the resumed coefficients) and the calibration texts' own next-token loss.
    common = (
        "--model.scheduler",
        "constant",
        "--trainer.val_check_interval",
        "12",
        "--model.task_balance",
        "start_kl",
        "--model.ce_weight",
        "0.5",
    )
    straight = fit(tmp_path, "straight", "--trainer.max_steps", "24", *common)
    fit(tmp_path, "first-half", "--trainer.max_steps", "12", *common)
    checkpoint = next((tmp_path / "first-half-logs").rglob("*.ckpt"))
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert all(key.startswith("coefficients.") for key in stored["state_dict"])  # no model weights inside
    assert sum(stored["expertmerge"]["task_scales"].values()) == pytest.approx(3.0)
    resumed = fit(tmp_path, "resumed", "--trainer.max_steps", "24", "--ckpt_path", str(checkpoint), *common)
    assert all_coefficients(resumed) == pytest.approx(all_coefficients(straight), abs=1e-5)


def test_bad_config_fails_before_any_work(tiny_zoo, tmp_path: Path, capsys) -> None:
    code = main(
        [
            "fit",
            "--config",
            CONFIG,
            "--export.output_dir",
            str(tmp_path / "never"),
            "--model.experts",
            '{"arith": "zoo://tiny/experts/arith", "nope": "' + str(tmp_path / "missing") + '"}',
        ]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_stage2_checkpoint_resumes_the_chunkwise_stage(tiny_zoo, tmp_path: Path) -> None:
    # Stage 1 is 4 steps (one epoch of 12 batches), stage 2 8 steps; the run is resumed from stage 2's step-4
    # checkpoint with the same config (Lightning's CLI takes a checkpoint's hyperparameters over the config's).
    import torch

    from expertmerge.fit.stages import checkpoint_stage

    # Checkpoints at epoch boundaries (4 steps; test_robustness resumes mid-epoch). Each stage's Trainer writes
    # into its own log version folder.
    common = (
        "--model.chunking", "true", "--model.scheduler", "constant", "--trainer.max_steps", "4",
        "--model.stage2_steps", "8", "--trainer.limit_val_batches", "0", "--export.evaluate", "false",
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "4",
        "--trainer.callbacks.save_top_k", "-1",
    )  # fmt: skip
    straight = fit(tmp_path, "straight", *common)
    saved = {
        (checkpoint_stage(c), torch.load(c, weights_only=True)["global_step"]): c
        for c in (tmp_path / "straight-logs").rglob("*.ckpt")
    }
    assert set(saved) == {(1, 4), (2, 4), (2, 8)}  # each stage's Trainer checkpoints, saying its stage
    resumed = fit(tmp_path, "resumed", "--ckpt_path", str(saved[(2, 4)]), *common)
    assert all_coefficients(resumed) == pytest.approx(all_coefficients(straight), abs=1e-5)
    # the resumed run ran stage 2 only, its last 4 steps (8 stage-2 steps in all), and exported chunk-wise
    assert '"steps": 8' in (resumed / "README.md").read_text()
    assert (resumed / "chunk_allocation.json").is_file()


def test_expert_merging_plus_plus_improves_on_layerwise(tiny_zoo, tmp_path: Path) -> None:
    out = fit(tmp_path, "chunked", "--model.chunking", "true", "--model.stage2_steps", "36")
    scores = json.loads((out / "eval.json").read_text())
    chunkwise = mean_kl(scores, "expert merging++ (chunk-wise)")
    layerwise = mean_kl(scores, "expert merging (layer-wise)")
    assert chunkwise < layerwise, (chunkwise, layerwise)
    # stage2_select held_out (the default) kept the chunks, as their held-out objective is lower; it says so
    card = (out / "README.md").read_text()
    assert '"kept": true' in card and "objective_chunk_wise" in card
    allocation = json.loads((out / "chunk_allocation.json").read_text())
    assert allocation["chunkwise_coefficients"] <= 1.2 * allocation["layerwise_coefficients"]
    assert allocation["total_chunks"] <= allocation["budget"]
    for picture in ("coefficients.png", "importance.png", "chunks.png"):
        assert (out / picture).stat().st_size > 1000


def test_fused_moe_export_loads_generates_and_tuned_router_helps(tiny_zoo, tmp_path: Path) -> None:
    out = fit(tmp_path, "moe", "--model.moe", "true", "--model.router_tuning_steps", "40")
    moe_dir = tmp_path / "moe-moe"
    model, info = AutoModelForCausalLM.from_pretrained(moe_dir, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    generated = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    scores = json.loads((moe_dir / "eval.json").read_text())
    initial = mean_kl(scores, "MoE (router hidden, top-2)")
    tuned = mean_kl(scores, "MoE (router tuned, top-2)")
    oracle = mean_kl(scores, "MoE backbone, oracle routing")
    dense = mean_kl(scores, "expert merging")
    assert initial < dense, (initial, dense)  # hidden-state routing alone beats the dense merge
    assert tuned < initial, (tuned, initial)
    assert tuned < dense, (tuned, dense)  # the MoE keeps more of the experts than any dense merge of them
    assert oracle < tuned  # a perfect router is the bound the tuned one approaches
    card = (moe_dir / "README.md").read_text()
    assert "hidden" in card and "top" in card.lower()
    assert (out / "config.json").is_file()


def test_export_and_evaluate_commands_reproduce_the_fit(layerwise_fit: Path, tmp_path: Path) -> None:
    checkpoint = next((layerwise_fit.parent / "layerwise-logs").rglob("*.ckpt"))
    again = tmp_path / "re-exported"
    assert main(["export", "--config", CONFIG, "--ckpt_path", str(checkpoint), "--out", str(again)]) == 0
    fitted = AutoModelForCausalLM.from_pretrained(layerwise_fit).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(again).state_dict().items():
        torch.testing.assert_close(tensor, fitted[name], atol=0, rtol=0)
    report = tmp_path / "scores.json"
    assert main(["evaluate", "--config", CONFIG, "--model", f"merged={again}", "--json", str(report)]) == 0
    scores = json.loads(report.read_text())
    expected = json.loads((layerwise_fit / "eval.json").read_text())
    assert mean_kl(scores, "merged") == pytest.approx(mean_kl(expected, "expert merging"), rel=1e-4)
    assert mean_kl(scores, "base") == pytest.approx(mean_kl(expected, "base"), rel=1e-4)


def test_rounds_give_the_same_fit_as_accumulating_one_batch_per_task(
    layerwise_fit: Path, tmp_path: Path
) -> None:
    """`data.rounds: true` puts one batch of every task in each step: no accumulate_grad_batches needed."""
    rounds = fit(tmp_path, "rounds", "--data.rounds", "true", "--trainer.accumulate_grad_batches", "1")
    assert all_coefficients(rounds) == pytest.approx(all_coefficients(layerwise_fit), abs=1e-5)


def test_task_balance_divides_each_task_by_its_start_kl(tiny_zoo) -> None:
    """`task_balance: start_kl`: scale_t = (1 / KL_t at the start) / mean over tasks, KL_t token-weighted over
    all of the task's training samples (checked here in one batch per task, against the chunked pass)."""
    from expertmerge.losses import kl_to_teacher

    module = _prepared_tiny("--model.task_balance", "start_kl")
    datamodule = module.calibration.datamodule
    module.options.loss.teacher_batch_size = 5  # chunks that do not divide the sample count
    scales = module.objective.start_task_scales(module.options.loss.task_balance)
    kls = {}
    with torch.no_grad():
        for task in module.task_names:
            samples = datamodule.task_samples(task, "train")
            ids, mask = samples.input_ids, samples.attention_mask
            targets = module.calibration.targets[(task, "train")].rows(
                torch.arange(ids.shape[0]), ids.shape[1], ids.device
            )
            per_token = kl_to_teacher(module.merged(ids, mask).logits, targets)
            kls[task] = float((per_token * mask).sum() / mask.sum())
    inverse = {t: 1 / kl for t, kl in kls.items()}
    expected = {t: v * len(inverse) / sum(inverse.values()) for t, v in inverse.items()}
    assert scales == pytest.approx(expected, rel=1e-4)
    assert sum(scales.values()) == pytest.approx(len(scales))
    assert max(scales.values()) / min(scales.values()) > 1.1, scales  # the tiny tasks' start KLs differ


def test_expert_gain_balance_divides_each_task_by_its_experts_gain_over_the_base(tiny_zoo) -> None:
    """`task_balance: expert_gain`: scale_t = (1 / gain_t) / mean, gain_t = base NLL - expert NLL on the task's
    training texts, each measured here by loading the real base and expert models (the tiny experts are full
    fine-tunes, so the fit's own model already holds folded tensors and cannot stand in for the base)."""
    from expertmerge.losses import next_token_nll

    module = _prepared_tiny("--model.task_balance", "expert_gain")
    datamodule = module.calibration.datamodule
    scales = module.objective.start_task_scales(module.options.loss.task_balance)

    def nll(folder: Path, task: str) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        samples = datamodule.task_samples(task, "train")
        with torch.no_grad():
            logits = model(input_ids=samples.input_ids, attention_mask=samples.attention_mask).logits
        per_token, mask = next_token_nll(logits, samples.input_ids, samples.attention_mask)
        return float((per_token * mask).sum() / mask.sum())

    gains = {t: nll(tiny_zoo / "base", t) - nll(tiny_zoo / "experts" / t, t) for t in module.task_names}
    assert module.calibration.expert_gains() == pytest.approx(gains, rel=1e-4, abs=1e-5)
    assert all(g > 0.05 for g in gains.values()), gains  # each tiny expert really learned its task
    inverse = {t: 1 / g for t, g in gains.items()}
    expected = {t: v * len(inverse) / sum(inverse.values()) for t, v in inverse.items()}
    assert scales == pytest.approx(expected, rel=1e-3)
    assert max(scales.values()) / min(scales.values()) > 1.1, scales


def test_expert_gain_scales_floor_tiny_gains_and_leave_base_tasks_at_one() -> None:
    from expertmerge.losses import expert_gain_scales

    scales = expert_gain_scales({"a": 1.0, "b": 0.5, "c": -0.2, "general": None})
    # c's gain (worse than the base) counts as 0.1 x the largest: inverses 1, 2, 10 -> mean 13/3
    assert scales == pytest.approx({"a": 3 / 13, "b": 6 / 13, "c": 30 / 13, "general": 1.0})
    assert expert_gain_scales({"general": None}) == {"general": 1.0}


def test_alpha0_search_starts_where_task_arithmetic_has_the_lowest_calibration_objective(tiny_zoo) -> None:
    """`alpha0_search`: each candidate's recorded objective is that of a module prepared at that fixed alpha0
    (learned coefficients and the unlearned tensors, which full fine-tunes change, at the value); the lowest
    one is the start, and the unlearned tensors are left merged at it."""

    def objective(module) -> float:
        """The fit's start objective: task losses weighted by the `expert_gain` scales (the default balance)."""
        losses = module.objective.split_losses()
        scales = {t: module.task_scales[t] for t in losses}
        return sum(scales[t] * float(module.objective.task_objective(losses[t])) for t in losses) / sum(
            scales.values()
        )

    candidates = [0.1, 0.3, 0.6]
    searched = _prepared_tiny("--model.alpha0_search", json.dumps(candidates))
    assert list(searched.start_scores) == [("task_arithmetic", v) for v in candidates]
    scores = {value: searched.start_scores[("task_arithmetic", value)] for value in candidates}
    best = min(candidates, key=scores.__getitem__)
    assert searched.merged.start_alpha == best and searched.merged.start_merge == "task_arithmetic"
    assert float(searched.merged.coefficients.alpha0[0]) == pytest.approx(best)
    assert objective(searched) == pytest.approx(scores[best], rel=1e-5)
    fixed = {}
    for value in candidates:
        fixed[value] = _prepared_tiny("--model.alpha0", str(value))
        assert objective(fixed[value]) == pytest.approx(scores[value], rel=1e-5)
    spread = max(scores.values()) - min(scores.values())
    assert spread > 1e-3, scores  # the candidates really differ on the tiny zoo
    other = dict(fixed[next(v for v in candidates if v != best)].merged.model.named_parameters())
    at_best = dict(fixed[best].merged.model.named_parameters())
    unlearned = [n for n in at_best if n not in searched.merged.coefficient_names]
    for name in unlearned:
        torch.testing.assert_close(
            searched.merged.model.get_parameter(name), at_best[name], rtol=0, atol=1e-6
        )
    # some unlearned tensor has a task vector (full fine-tunes), so the fold at the chosen value was exercised
    assert any(not torch.equal(at_best[name], other[name]) for name in unlearned)


def _prepared_tiny(*overrides: str):
    """The tiny config's learned merge, prepared (models, task vectors, teacher targets, start) and not fitted."""
    from expertmerge.cli.fit import read_fit_config

    config = read_fit_config(CONFIG, overrides)
    config.model.run.datamodule = config.datamodule
    return config.model.run.prepare()


def _tiny_regmean_merge(module, alpha: float) -> dict[str, torch.Tensor]:
    """RegMean of the tiny experts computed independently: each expert's own input Grams on its task's
    training calibration samples (`expertmerge.regmean`), the learned linear weights only."""
    from expertmerge.regmean import input_grams, regmean_state_dict

    learned = set(module.merged.coefficient_names)
    names = [
        n
        for n, m in module.merged.model.named_modules()
        if isinstance(m, torch.nn.Linear) and f"{n}.weight" in learned
    ]
    states, grams = [], []
    for task, k in zip(module.task_names, module.calibration.task_experts, strict=True):
        expert = AutoModelForCausalLM.from_pretrained(
            str(module.pool.expert_dirs[module.expert_names[k]]), dtype=torch.float32
        ).eval()
        samples = module.calibration.datamodule.task_samples(task, "train")
        grams.append(input_grams(expert, names, samples.input_ids, samples.attention_mask))
        states.append({f"{n}.weight": expert.get_submodule(n).weight.detach().clone() for n in names})
    return regmean_state_dict(states, grams, alpha)


def test_regmean_start_is_regmean_and_learns_on_top_of_it(tiny_zoo) -> None:
    """`start_merges: [regmean]` at alpha0 = 1/N: the fit's start (every coefficient at alpha0) is RegMean's
    merge of the learned linear weights, computed independently; at another alpha0 it is that merge's
    difference from the base scaled by N * alpha0; the coefficients still move the merge along the task
    vectors from there. Task vectors in fp32 here: stored in bf16 (the default) the start differs from RegMean
    by their rounding (5e-5 on the tiny zoo), as task arithmetic's start does."""
    third = 1.0 / 3.0
    fp32 = ("--model.task_vector_dtype", "float32")
    module = _prepared_tiny("--model.start_merges", '["regmean"]', "--model.alpha0", str(third), *fp32)
    assert module.merged.start_merge == "regmean" and module.merged.start_alpha == pytest.approx(third)
    expected = _tiny_regmean_merge(module, 0.9)
    assert expected  # the tiny Llama's attention and MLP projections
    start = module.merged.merged_parameters(module.merged.alpha0_coefficients)
    for name, tensor in expected.items():
        torch.testing.assert_close(start[name], tensor, rtol=0, atol=2e-5)
    base = {
        n: AutoModelForCausalLM.from_pretrained(str(module.pool.base_dir)).get_parameter(n) for n in expected
    }
    average = {
        n: base[n] + module.merged.task_vectors[module.merged.coefficient_names.index(n)].float().mean(0)
        for n in expected
    }
    moved = max(float((expected[n] - average[n]).abs().max()) for n in expected)
    assert moved > 1e-3, moved  # RegMean really differs from the average here
    scaled = _prepared_tiny("--model.start_merges", '["regmean"]', "--model.alpha0", "0.5", *fp32)
    start = scaled.merged.merged_parameters(scaled.merged.alpha0_coefficients)
    for name, tensor in expected.items():
        torch.testing.assert_close(start[name], base[name] + 1.5 * (tensor - base[name]), rtol=0, atol=5e-5)
    # the learned coefficients act on top of the start: c = alpha0 + 0.1 moves by 0.1 x the summed vectors
    index = module.merged.coefficient_names.index(next(iter(expected)))
    name = module.merged.coefficient_names[index]
    shifted = module.merged.merged_parameters(lambda i: module.merged.alpha0_coefficients(i) + 0.1)
    tau = module.merged.task_vectors[index].float().sum(0)
    torch.testing.assert_close(shifted[name], expected[name] + 0.1 * tau, rtol=0, atol=5e-5)


def test_start_search_over_task_arithmetic_and_regmean(tiny_zoo) -> None:
    """Both merges at every candidate value plus plain RegMean (1/N); each recorded objective equals a module
    prepared at that single start, and the chosen one is the lowest, left in place."""

    def objective(module) -> float:
        losses = module.objective.split_losses()
        scales = {t: module.task_scales[t] for t in losses}
        return sum(scales[t] * float(module.objective.task_objective(losses[t])) for t in losses) / sum(
            scales.values()
        )

    both = '["task_arithmetic", "regmean"]'
    searched = _prepared_tiny("--model.start_merges", both, "--model.alpha0_search", "[0.2, 0.6]")
    keys = list(searched.start_scores)
    assert keys == [
        ("task_arithmetic", 0.2),
        ("task_arithmetic", 0.6),
        ("regmean", 0.2),
        ("regmean", 0.6),
    ] + [("regmean", pytest.approx(1 / 3))]
    best = min(keys, key=searched.start_scores.__getitem__)
    assert (searched.merged.start_merge, searched.merged.start_alpha) == best
    assert objective(searched) == pytest.approx(searched.start_scores[best], rel=1e-5)
    single = _prepared_tiny("--model.start_merges", '["regmean"]', "--model.alpha0", "0.6")
    assert objective(single) == pytest.approx(searched.start_scores[("regmean", 0.6)], rel=1e-5)
    assert (
        abs(searched.start_scores[("regmean", 0.6)] - searched.start_scores[("task_arithmetic", 0.6)]) > 1e-4
    )
    assert searched.start_scores_json()["regmean"]["0.333333"] == pytest.approx(
        searched.start_scores[keys[-1]], abs=1e-6
    )


def test_start_search_can_judge_the_candidates_on_the_held_out_calibration_samples(tiny_zoo) -> None:
    """`start_search_split: eval`: each candidate's recorded objective is the objective on the held-out
    calibration samples of a module prepared at that single start, not the training samples' one."""
    search = ("--model.start_merges", '["task_arithmetic", "regmean"]', "--model.alpha0_search", "[0.2, 0.6]")
    held_out = _prepared_tiny(*search, "--model.start_search_split", "eval")
    training = _prepared_tiny(*search)
    assert list(held_out.start_scores) == list(training.start_scores)
    for merge, value in [("regmean", 0.6), ("task_arithmetic", 0.2)]:
        single = _prepared_tiny("--model.start_merges", f'["{merge}"]', "--model.alpha0", str(value))
        assert single.objective.split_objective("eval") == pytest.approx(
            held_out.start_scores[(merge, value)], rel=1e-5
        )
        assert single.objective.split_objective("train") == pytest.approx(
            training.start_scores[(merge, value)], rel=1e-5
        )
        assert abs(held_out.start_scores[(merge, value)] - training.start_scores[(merge, value)]) > 1e-3
    best = min(held_out.start_scores, key=held_out.start_scores.__getitem__)
    assert (held_out.merged.start_merge, held_out.merged.start_alpha) == best


def test_stage2_select_goes_back_to_the_layer_wise_values_when_the_chunks_do_worse(tiny_zoo) -> None:
    """`stage2_select: held_out`: chunk-wise coefficients that raise the held-out objective are replaced by the
    layer-wise values (each chunk at its tensor's stage-1 value). (A real fit whose chunks do better keeps them:
    test_expert_merging_plus_plus_improves_on_layerwise.)"""
    module = _prepared_tiny("--model.chunking", "true")
    stage1 = module.merged.stage1_snapshot()
    module.enter_stage2(stage1)
    at_stage1 = module.objective.split_objective("eval")
    with torch.no_grad():  # chunk-wise coefficients far from stage 1: every chunk of every tensor near 1
        for logits in module.merged.coefficients.logits:
            logits.fill_(6.0)
    worse = module.objective.split_objective("eval")
    assert worse > at_stage1 + 1e-3
    choice = module.select_stage2()
    assert choice["kept"] is False
    assert choice["objective_chunk_wise"] - choice["objective_layer_wise"] == pytest.approx(
        worse - at_stage1, rel=0.2
    )
    assert choice["standard_error"] > 0
    values = module.merged.coefficients.layerwise_values()
    for i, name in enumerate(module.merged.coefficient_names):
        torch.testing.assert_close(values[:, i].cpu(), stage1[name], rtol=0, atol=1e-5)


def test_paired_objectives_weigh_tokens_within_and_tasks_across() -> None:
    from expertmerge.fit.stages import paired_objectives

    def t(*values: float) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    before = {"a": (t(1, 2), t(1, 3)), "b": (t(4), t(2))}
    after = {"a": (t(0, 2), t(1, 3)), "b": (t(3), t(2))}
    mean_before, mean_after, error = paired_objectives(before, after, {"a": 1.0, "b": 3.0})
    # task a: tokens 1:3 -> 0.25 * 1 + 0.75 * 2 = 1.75 (after 1.5); task b: 4 (after 3); tasks 1:3
    assert mean_before == pytest.approx(0.25 * 1.75 + 0.75 * 4)
    assert mean_after == pytest.approx(0.25 * 1.5 + 0.75 * 3)
    # only task a has two samples: differences -1, 0 around their token-weighted mean -0.25, Bessel-corrected
    factors = [0.25 * 0.25, 0.25 * 0.75]
    variance = (factors[0] ** 2 * 0.75**2 + factors[1] ** 2 * 0.25**2) * 2
    assert error == pytest.approx(variance**0.5)


def test_regmean_start_refuses_an_expert_without_calibration_texts(tiny_zoo, tmp_path) -> None:
    from expertmerge.errors import ExpertMergeError

    tasks = json.dumps(
        [
            {"name": "arith", "expert": "arith", "sources": ["zoo://tiny/data/arith_calib.jsonl"]},
            {"name": "reverse", "expert": "reverse", "sources": ["zoo://tiny/data/reverse_calib.jsonl"]},
        ]
    )
    with pytest.raises(ExpertMergeError, match=r"experts \['sort'\] teach no task"):
        _prepared_tiny("--model.start_merges", '["regmean"]', "--data.tasks", tasks)
    with pytest.raises((ExpertMergeError, ValueError), match="start_merges names a merge twice"):
        _prepared_tiny("--model.start_merges", '["regmean", "regmean"]')


def test_a_checkpoint_from_another_start_is_refused(tiny_zoo) -> None:
    """The coefficients are relative to their start: resuming or exporting a checkpoint whose start (merge,
    alpha0) is not the one this config's prepare arrives at is an error naming both."""
    from expertmerge.errors import ExpertMergeError

    module = _prepared_tiny()
    checkpoint: dict = {"state_dict": {}}
    checkpoint["expertmerge"] = module.checkpoint_section()
    assert checkpoint["expertmerge"]["start"] == ["task_arithmetic", 0.3]
    module.restore(checkpoint["expertmerge"])  # its own start: accepted
    checkpoint["expertmerge"]["start"] = ["regmean", 0.3]
    with pytest.raises(ExpertMergeError, match="learned from the start regmean at alpha0 0.3"):
        module.restore(checkpoint["expertmerge"])


def test_kl_where_expert_better_counts_the_kl_only_where_the_expert_predicts_the_text_better(
    tiny_zoo,
) -> None:
    """`kl_where: expert_better`: the objective's KL is the per-token KL times 1 where the cached expert NLL of
    the next token is below the merge's (positions without a next token keep theirs), over all real tokens;
    the reported KL stays the full one, and the option needs the text's own loss."""
    from expertmerge.cli.fit import read_fit_config
    from expertmerge.errors import ExpertMergeError
    from expertmerge.losses import next_token_nll

    plain = _prepared_tiny()
    module = _prepared_tiny("--model.kl_where", "expert_better")
    batch = next(iter(module.calibration.datamodule.train_dataloader()))
    batch = batch[0] if isinstance(batch, list) else batch
    parts, reference = module.objective.task_losses(batch), plain.objective.task_losses(batch)
    torch.testing.assert_close(parts["kl"], reference["kl"])  # same coefficients, same full KL
    task = module.task_names[int(batch["task_index"])]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expert_nll = module.calibration.targets[(task, "train")].rows(batch["sample_index"], ids.shape[1])["nll"]
    with torch.no_grad():
        logits = module.merged(ids, mask).logits
    merge_nll, _ = next_token_nll(logits, ids, mask)
    behind = (expert_nll[:, :-1] < merge_nll).float()
    weight = torch.cat([behind, torch.ones(behind.shape[0], 1)], dim=1)
    assert 0 < float((behind * mask[:, 1:]).sum()) < float(mask[:, 1:].sum())  # both kinds of token occur
    expected = (parts["kl_tokens"] * weight * mask).sum() / mask.sum()
    torch.testing.assert_close(parts["kl_fit"], expected, rtol=1e-5, atol=1e-7)
    assert float(parts["kl_fit"].detach()) < float(parts["kl"].detach())
    objective = module.objective.task_objective(parts)
    torch.testing.assert_close(objective, parts["kl_fit"] + module.options.loss.ce_weight * parts["ce"])
    assert "kl_fit" not in reference
    with pytest.raises((ExpertMergeError, ValueError), match="set model.ce_weight > 0"):
        read_fit_config(CONFIG, ["--model.kl_where", "expert_better", "--model.ce_weight", "0"])
