"""The fit reads task vectors from the lazy pool and builds an expert model only for uncached teacher targets.

Real tiny Llama models (conftest) and real safetensors; the only thing wrapped is
`PreTrainedModel.from_pretrained`, to count which model folders get instantiated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXPERT_NAMES, copy_model, perturbed, save_model, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from expertmerge.cli import main
from expertmerge.pool import ExpertPool
from expertmerge.teachers import TeacherSettings, cache_key

ALPHA0 = 0.3


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty cache of this test's own: teacher entries from other tests can neither help nor leak."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXPERTMERGE_CACHE", str(cache))
    return cache


@pytest.fixture
def model_loads(monkeypatch) -> list[Path]:
    """Every folder `from_pretrained` instantiates a model from, in order (the real loader still runs)."""
    loaded: list[Path] = []
    original = PreTrainedModel.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        loaded.append(Path(path).resolve())
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    return loaded


def write_config(tmp: Path, base: Path, experts: dict[str, Path]) -> Path:
    """A fit config over the given models: one task per expert, word-level texts the tiny tokenizer knows."""
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for k, name in enumerate(experts):
        rows = [
            {"text": " ".join(f"w{int(i)}" for i in torch.randint(4, 64, (12,), generator=generator))}
            for _ in range(12)
        ]
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tasks.append({"name": f"task{k}", "expert": name, "sources": [str(path)]})
    config = {
        "model": {"base": str(base), "experts": {n: str(p) for n, p in experts.items()}, "alpha0": ALPHA0},
        "data": {
            "tasks": tasks,
            "samples_per_task": 8,
            "eval_samples_per_task": 4,
            "max_length": 16,
            "batch_size": 4,
        },
        "trainer": {
            "max_steps": 2,
            "limit_val_batches": 0,
            "enable_checkpointing": False,
            "logger": False,
            "enable_progress_bar": False,
        },
        "export": {"evaluate": False},
    }
    path = tmp / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_fit(config: Path, out: Path) -> int:
    return main(
        [
            "fit",
            "--config",
            str(config),
            "--export.output_dir",
            str(out),
            "--trainer.default_root_dir",
            f"{out}-logs",
        ]
    )


def coefficients(folder: Path) -> list[float]:
    table = json.loads((folder / "coefficients.json").read_text())["coefficients"]
    return [v for tensor in sorted(table) for expert in sorted(table[tensor]) for v in table[tensor][expert]]


def test_warm_teacher_cache_fit_builds_no_expert_model_and_a_cold_one_builds_each_once(
    tiny_models, private_cache: Path, tmp_path: Path, model_loads: list[Path], capsys
) -> None:
    config = write_config(tmp_path, tiny_models.base, tiny_models.experts)
    expert_dirs = {path.resolve() for path in tiny_models.experts.values()}

    assert run_fit(config, tmp_path / "cold") == 0
    cold_loads = [path for path in model_loads if path in expert_dirs]
    assert sorted(cold_loads) == sorted(expert_dirs)  # each expert exactly once, for its teacher targets
    assert "6 / 0" in capsys.readouterr().out  # teacher targets computed / reused
    assert len(list((private_cache / "teachers").glob("*.safetensors"))) == 6

    model_loads.clear()
    assert run_fit(config, tmp_path / "warm") == 0
    assert [path for path in model_loads if path in expert_dirs] == []  # task vectors came from the pool
    assert tiny_models.base.resolve() in model_loads  # the base is the model that runs the merge
    assert "0 / 6" in capsys.readouterr().out
    assert coefficients(tmp_path / "warm") == pytest.approx(coefficients(tmp_path / "cold"), abs=1e-6)


def test_fit_with_a_nan_expert_tensor_fails_before_training_naming_expert_and_tensor(
    tiny_models, private_cache: Path, tmp_path: Path, capsys
) -> None:
    broken = copy_model(tiny_models.experts["beta"], tmp_path / "beta-broken")
    weights = load_file(broken / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj.weight"
    weights[name][3, 5] = float("nan")
    weights[name][0, 0] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    experts = {**tiny_models.experts, "beta": broken}
    config = write_config(tmp_path, tiny_models.base, experts)

    out = tmp_path / "out"
    assert run_fit(config, out) == 2
    error = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "expert 'beta'" in error and f"'{name}'" in error and "2 NaN/Inf value(s)" in error
    assert not out.exists()  # no model, no logs
    assert not list((private_cache / "teachers").glob("*"))  # not even teacher targets: it failed first


def test_task_vectors_of_a_tied_model_come_from_the_checkpoints_and_merge_like_the_models(
    tiny_models, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from expertmerge.coefficients import TaskVectors
    from expertmerge.fit.merged import MergedModel
    from expertmerge.fit.options import FitOptions, StartOptions
    from expertmerge.fit.prepare import read_task_vectors

    tokenizer = tiny_tokenizer()
    base = tiny_llama(seed=3, tie_word_embeddings=True)
    experts = {name: perturbed(base, seed=10 + k) for k, name in enumerate(EXPERT_NAMES)}
    base_dir = save_model(base, tmp_path / "base", tokenizer=tokenizer)
    expert_dirs = {
        name: str(save_model(m, tmp_path / name, tokenizer=tokenizer)) for name, m in experts.items()
    }
    pool = ExpertPool(str(base_dir), expert_dirs).validate()
    student = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    keys = pool.parameter_keys(student)
    assert set(keys) == {name for name, _ in student.named_parameters()}  # lm_head is the embedding
    assert set(keys.values()) <= set(pool.tensor_names)

    # The fit's own reader, over one learned tensor: its task vectors go to the buffer, the rest merge now.
    learned = "model.layers.0.mlp.up_proj.weight"
    options = FitOptions(str(base_dir), expert_dirs, start=StartOptions(alpha0=ALPHA0))
    tau = TaskVectors([student.get_parameter(learned).shape], 3, torch.bfloat16)
    merged = MergedModel(student, list(expert_dirs), [learned], tau)
    read_task_vectors(options, pool, merged)

    theta = {name: dict(m.named_parameters()) for name, m in experts.items()}
    theta0 = dict(base.named_parameters())
    for k, name in enumerate(EXPERT_NAMES):
        expected = (theta[name][learned] - theta0[learned]).to(torch.bfloat16)
        assert torch.equal(merged.task_vectors[0][k], expected)
    for name, parameter in student.named_parameters():
        if name == learned:
            assert torch.equal(parameter, theta0[name])  # merged at every step, not now
            continue
        expected = theta0[name] + sum(ALPHA0 * (theta[e][name] - theta0[name]) for e in EXPERT_NAMES)
        assert torch.allclose(parameter, expected, atol=1e-6), name
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied


def test_teacher_cache_key_names_attention_implementation_and_library_versions(monkeypatch) -> None:
    import transformers

    settings = TeacherSettings(hidden_layers=(1,))
    key = cache_key("expert", "data", settings)
    assert key == cache_key("expert", "data", TeacherSettings(hidden_layers=(1,), batch_size=2))
    assert key != cache_key(
        "expert", "data", TeacherSettings(hidden_layers=(1,), attn_implementation="eager")
    )
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert key != cache_key("expert", "data", settings)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert key != cache_key("expert", "data", settings)


def test_teacher_targets_of_a_broken_expert_are_refused_and_not_cached(
    tiny_models, private_cache: Path, tmp_path: Path
) -> None:
    # The sequence MoE and `evaluate` read no task vectors: the teacher pass itself must catch a NaN expert.
    from expertmerge.cli.fit import read_fit_config
    from expertmerge.errors import ExpertMergeError
    from expertmerge.teachers import teacher_targets

    broken = copy_model(tiny_models.experts["gamma"], tmp_path / "gamma-broken")
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    experts = {**tiny_models.experts, "gamma": broken}
    datamodule = read_fit_config(str(write_config(tmp_path, tiny_models.base, experts))).datamodule
    datamodule.setup("validate")

    settings = TeacherSettings(hidden_layers=())
    with pytest.raises(ExpertMergeError, match=r"expert 'gamma' gives non-finite teacher targets .* 'task2'"):
        teacher_targets(datamodule, experts, settings, ("eval",))
    assert len(list((private_cache / "teachers").glob("*.safetensors"))) == 2  # alpha's and beta's only
    targets, stats = teacher_targets(
        datamodule, {n: p for n, p in experts.items() if n != "gamma"}, settings, ("eval",)
    )
    assert (stats.computed, stats.reused) == (0, 2) and set(targets) == {("task0", "eval"), ("task1", "eval")}


# ------------------------------------------------------------------------- `expert: base` (the base teaches)
def with_base_task(config: Path, **model: object) -> Path:
    """`config` plus a task taught by the base (`expert: base`) on texts of its own, and extra model keys."""
    spec = yaml.safe_load(config.read_text())
    generator = torch.Generator().manual_seed(7)
    rows = [
        {"text": " ".join(f"w{int(i)}" for i in torch.randint(4, 64, (10,), generator=generator))}
        for _ in range(12)
    ]
    path = config.parent / "general.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec["data"]["tasks"].append({"name": "general", "expert": "base", "sources": [str(path)]})
    spec["model"].update(model)
    out = config.with_name("fit-base-task.yaml")
    out.write_text(yaml.safe_dump(spec))
    return out


def test_a_base_task_is_taught_by_the_base_once_cached_and_fits_layer_and_chunk_wise(
    tiny_models, private_cache: Path, tmp_path: Path, model_loads: list[Path], capsys
) -> None:
    from expertmerge.cli.fit import read_fit_config
    from expertmerge.teachers import teacher_forwards

    config = with_base_task(
        write_config(tmp_path, tiny_models.base, tiny_models.experts), chunking=True, stage2_steps=2
    )
    forwards = teacher_forwards()
    assert run_fit(config, tmp_path / "cold") == 0
    # the base: once for the merge, once as the teacher of 'general' (both of its splits), once for the export's
    # health check (its perplexity beside the merge's)
    assert model_loads.count(tiny_models.base.resolve()) == 3
    out = capsys.readouterr().out
    assert "8 / 0" in out and "chunk" in out  # 4 tasks x 2 splits computed; stage 2 ran
    assert teacher_forwards() - forwards == 8  # one batch per (task, split) here
    card = (tmp_path / "cold" / "README.md").read_text()
    assert "general" in card

    # Read back through the one teacher API: all 8 from the cache (no forward), 'general' = the base's logits.
    from transformers import AutoModelForCausalLM

    from expertmerge.teachers import teacher_dirs, teacher_targets

    datamodule = read_fit_config(str(config)).datamodule
    datamodule.setup("fit")
    pool = ExpertPool(str(tiny_models.base), {n: str(p) for n, p in tiny_models.experts.items()})
    forwards = teacher_forwards()
    targets, stats = teacher_targets(
        datamodule,
        teacher_dirs(pool.base_dir, pool.expert_dirs, datamodule.tasks),
        TeacherSettings(hidden_layers=()),  # the fit's: no hidden states (mu 0), top-64 logits
        expert_hashes=pool.content_hashes(),
    )
    assert (stats.computed, stats.reused, teacher_forwards() - forwards) == (0, 8, 0)
    samples = datamodule.task_samples("general", "eval")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models.base), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = base(input_ids=samples.input_ids, attention_mask=samples.attention_mask).logits
    real = samples.attention_mask.bool()
    cached = targets[("general", "eval")].tensors["topk_values"]
    torch.testing.assert_close(cached[real], logits.topk(64, dim=-1).values[real], atol=1e-5, rtol=1e-5)


def test_a_base_task_in_the_fused_moe_runs_through_the_base_ffn_or_is_refused_without_one(
    tiny_models, private_cache: Path, tmp_path: Path, capsys
) -> None:
    config = write_config(tmp_path, tiny_models.base, tiny_models.experts)
    refused = with_base_task(config, moe=True)
    assert run_fit(refused, tmp_path / "refused") == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "['general']" in error and "model.moe_include_base_expert true" in error
    assert not (tmp_path / "refused").exists()

    accepted = with_base_task(config, moe=True, moe_include_base_expert=True, moe_top_k=2)
    assert run_fit(accepted, tmp_path / "moe") == 0
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe-moe")).eval()
    assert moe.config.num_local_experts == 4  # alpha, beta, gamma and the base FFN (routed, Mixtral)
    gate = moe.model.layers[0].mlp.gate.weight
    assert gate.shape[0] == 4
    # The base row comes from the 'general' task's data (a class of its own), not the experts' mean row.
    assert not torch.allclose(gate[3], gate[:3].mean(0), atol=1e-4)


@pytest.mark.parametrize("how", ["renamed_over", "overwritten_in_place"])
def test_an_expert_replaced_with_the_same_size_and_mtime_is_hashed_and_taught_anew(
    tiny_models, private_cache: Path, tmp_path: Path, how: str
) -> None:
    import os

    from expertmerge.cli.fit import read_fit_config
    from expertmerge.hashing import file_hash, model_content_hash
    from expertmerge.teachers import teacher_targets

    expert = copy_model(tiny_models.experts["alpha"], tmp_path / "alpha")
    weights = expert / "model.safetensors"
    experts = {"alpha": expert}
    datamodule = read_fit_config(str(write_config(tmp_path, tiny_models.base, experts))).datamodule
    datamodule.setup("validate")
    settings = TeacherSettings(hidden_layers=())
    before, old_file, old_model = weights.stat(), file_hash(weights), model_content_hash(expert)
    old_targets, stats = teacher_targets(datamodule, experts, settings, ("eval",))
    assert (stats.computed, stats.reused) == (1, 0)

    # Other weights of the same shapes: the same file size to the byte. The mtime is put back as it was.
    other = tmp_path / "other.safetensors"
    save_model(perturbed(tiny_llama(seed=0), seed=99), tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").rename(other)
    assert other.stat().st_size == before.st_size and other.read_bytes() != weights.read_bytes()
    if how == "renamed_over":
        os.replace(other, weights)
    else:
        weights.write_bytes(other.read_bytes())
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    assert file_hash(weights) != old_file and model_content_hash(expert) != old_model
    new_targets, stats = teacher_targets(datamodule, experts, settings, ("eval",))
    assert (stats.computed, stats.reused) == (1, 0)  # the old expert's cached targets are not reused
    old, new = old_targets[("task0", "eval")].tensors, new_targets[("task0", "eval")].tensors
    assert set(old) == set(new) and any(not torch.equal(old[k], new[k]) for k in old)


def test_fit_and_evaluate_refuse_an_expert_that_is_the_base_before_any_work(
    tiny_models, private_cache: Path, tmp_path: Path, capsys
) -> None:
    experts = {"alpha": tiny_models.experts["alpha"], "same": copy_model(tiny_models.base, tmp_path / "same")}
    config = write_config(tmp_path, tiny_models.base, experts)
    assert run_fit(config, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: expert 'same'") and "has the same weights as the base model" in err
    assert "\n" not in err and not (tmp_path / "out").exists()
    assert not (private_cache / "teachers").exists()  # refused before any teacher pass
    assert main(["evaluate", "--config", str(config), "--model", str(tiny_models.experts["beta"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: expert 'same'") and "has the same weights as the base model" in err


def test_evaluate_refuses_a_nan_model_and_another_vocabulary_and_scores_a_sound_one(
    tiny_models, private_cache: Path, tmp_path: Path, capsys
) -> None:
    config = write_config(tmp_path, tiny_models.base, tiny_models.experts)
    nan = copy_model(tiny_models.experts["beta"], tmp_path / "nan-model")
    weights = load_file(nan / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    wider = save_model(tiny_llama(seed=5, vocab_size=80), tmp_path / "vocab-80")
    capsys.readouterr()  # the save's progress bar
    for model, expected in (
        (nan, r"tensor 'model\.layers\.1\.mlp\.down_proj\.weight' holds 1 NaN/Inf value\(s\)"),
        (wider, r"has vocab_size=80 but the base model \(.*\) has 64; .* cannot be scored"),
    ):
        assert main(["evaluate", "--config", str(config), "--model", f"x={model}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: evaluate --model x={model}") and "\n" not in err
        assert re.search(expected, err), err
    assert not (private_cache / "teachers").exists()  # refused before any teacher pass

    # Finite weights whose logits overflow: refused once scored, not a row of nonsense.
    huge = copy_model(tiny_models.experts["beta"], tmp_path / "huge-logits")
    weights = load_file(huge / "model.safetensors")
    weights["lm_head.weight"].fill_(3e38)
    save_file(weights, huge / "model.safetensors", metadata={"format": "pt"})
    assert main(["evaluate", "--config", str(config), "--model", f"x={huge}"]) == 2
    assert "NaN/Inf logits on the held-out samples" in capsys.readouterr().err
    assert main(["evaluate", "--config", str(config), "--model", f"x={tiny_models.experts['beta']}"]) == 0
