"""The fit reads task vectors from the lazy pool and builds an expert model only for uncached teacher targets.

Real tiny Llama models (conftest) and real safetensors; the only thing wrapped is
`PreTrainedModel.from_pretrained`, to count which model folders get instantiated.
"""

from __future__ import annotations

import json
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
    from lightning_modules.merging import ExpertMergingModule

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
    module = ExpertMergingModule(str(base_dir), expert_dirs, alpha0=ALPHA0)
    module.coefficient_names, module.ffn_names = [learned], []
    module.task_vectors = TaskVectors([student.get_parameter(learned).shape], 3, torch.bfloat16)
    module.ffn_vectors = TaskVectors([], 3, torch.bfloat16)
    module._read_task_vectors(pool, student)

    theta = {name: dict(m.named_parameters()) for name, m in experts.items()}
    theta0 = dict(base.named_parameters())
    for k, name in enumerate(EXPERT_NAMES):
        expected = (theta[name][learned] - theta0[learned]).to(torch.bfloat16)
        assert torch.equal(module.task_vectors[0][k], expected)
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
    from expertmerge.cli.fit import configured
    from expertmerge.errors import ExpertMergeError
    from expertmerge.teachers import teacher_targets

    broken = copy_model(tiny_models.experts["gamma"], tmp_path / "gamma-broken")
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    experts = {**tiny_models.experts, "gamma": broken}
    _, datamodule = configured(str(write_config(tmp_path, tiny_models.base, experts)), [])
    datamodule.setup("validate")

    settings = TeacherSettings(hidden_layers=())
    with pytest.raises(ExpertMergeError, match=r"expert 'gamma' gives non-finite teacher targets .* 'task2'"):
        teacher_targets(datamodule, experts, settings, ("eval",))
    assert len(list((private_cache / "teachers").glob("*.safetensors"))) == 2  # alpha's and beta's only
    targets, stats = teacher_targets(
        datamodule, {n: p for n, p in experts.items() if n != "gamma"}, settings, ("eval",)
    )
    assert (stats.computed, stats.reused) == (0, 2) and set(targets) == {("task0", "eval"), ("task1", "eval")}
