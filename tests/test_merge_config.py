"""The merge YAML schema against the methods' declared parameters (no model is opened: sources are hub ids)."""

from __future__ import annotations

import pytest
import yaml

from expertmerge.errors import ExpertMergeError
from expertmerge.merge_config.parse import parse_merge_config
from expertmerge.methods import METHODS, get_method


def _config(method: str, **top) -> dict:
    return {
        "merge_method": method,
        "base_model": "org/base",
        "models": [{"model": "org/a"}, {"model": "org/b", "parameters": {"weight": 0.25}}],
        **top,
    }


def test_each_method_declares_mergekits_parameters_and_defaults():
    declared = {
        name: {p.name: (p.scope, p.default) for p in method.parameters} for name, method in METHODS.items()
    }
    assert declared["average"] == {"weight": ("model", 1.0), "normalize": ("global", True)}
    assert declared["ties"] == {
        "weight": ("model", 1.0),
        "density": ("model", 1.0),
        "normalize": ("global", True),
        "lambda": ("global", 1.0),
        "rescale": ("global", False),
        "int8_mask": ("global", False),
    }
    assert "density" not in declared["task_arithmetic"]
    assert declared["dare_linear"]["rescale"] == ("global", True)
    assert declared["dare_ties"]["normalize"] == ("global", False)


def test_global_model_parameters_are_the_default_of_models_that_do_not_set_them():
    config = parse_merge_config(_config("ties", parameters={"weight": 0.5, "density": 0.7}))
    assert [m.parameters for m in config.models] == [
        {"weight": 0.5, "density": 0.7},
        {"weight": 0.25, "density": 0.7},
    ]
    assert config.parameters == {"normalize": True, "lambda": 1.0, "rescale": False, "int8_mask": False}


def test_resolved_config_reads_back_to_the_same_values():
    config = parse_merge_config(
        _config("dare_ties", parameters={"density": 0.4, "lambda": 0.8}, random_seed=5)
    )
    again = parse_merge_config(yaml.safe_load(config.to_mergekit_yaml()))
    assert [m.parameters for m in again.models] == [m.parameters for m in config.models]
    assert (again.parameters, again.seed, again.base_model) == (config.parameters, 5, "org/base")


def test_another_methods_parameter_is_ignored_with_a_warning_unless_at_its_no_effect_value():
    config = parse_merge_config(_config("task_arithmetic", parameters={"density": 1.0}))
    assert config.models[0].density == 1.0 and config.warnings == []
    assert parse_merge_config(_config("average", parameters={"lambda": 1})).parameters == {"normalize": True}
    config = parse_merge_config(_config("average", parameters={"int8_mask": True}))
    assert config.parameters == {"normalize": True}
    assert len(config.warnings) == 1 and config.warnings[0].startswith(
        "key 'parameters.int8_mask': int8_mask True has no effect with 'average' and is ignored"
    )


def test_keys_mergekit_ignores_are_one_warning_each_naming_the_key():
    config = _config("task_arithmetic", foo=1, parameters={"densty": 0.5})
    config["models"][0].update(lora="x", parameters={"density": 0.5, "lambda": 0.5, "weight": 0.3})
    parsed = parse_merge_config(config, "cfg.yaml")
    assert [w.split(":")[0] for w in parsed.warnings] == [
        "key 'foo'",
        "key 'models[0].lora'",
        "key 'parameters.densty'",
        "key 'models[0].parameters.density'",
        "key 'models[0].parameters.lambda'",
    ]
    assert "Did you mean 'density'" in parsed.warnings[2] and "once per merge" in parsed.warnings[4]
    assert parsed.models[0].parameters == {"weight": 0.3} and parsed.parameters["lambda"] == 1.0


def test_gradients_and_filters_resolve_per_tensor_as_mergekit_does():
    from expertmerge.methods.settings import resolve_values

    config = _config("ties", parameters={"density": [{"filter": "mlp", "value": [0.2, 0.6]}, {"value": 0.9}]})
    config["models"][0]["parameters"] = {
        "weight": [0.2, 0.5, 1.0],
        "density": [{"filter": "self_attn", "value": 0.4}],
    }
    parsed = parse_merge_config(config)
    method, top, own = parsed.method, parsed.settings, parsed.models[0].settings

    def model_values(name: str, t: float) -> dict:
        return resolve_values(method, "model", [own, top], name, t)

    # Gradient: linear between neighbours at t * (n - 1); t = 0 outside the layers (the first value).
    assert [model_values("x", t)["weight"] for t in (0, 0.25, 0.5, 0.75, 1)] == pytest.approx(
        [0.2, 0.35, 0.5, 0.75, 1.0]
    )
    # Filters: first match wins; none matching falls through to the top level's value, then the default.
    assert model_values("model.layers.1.self_attn.q_proj.weight", 0.5)["density"] == 0.4
    assert model_values("model.layers.1.mlp.up_proj.weight", 0.5)["density"] == pytest.approx(0.4)
    assert model_values("model.norm.weight", 0)["density"] == 0.9
    bools = parse_merge_config(_config("ties", parameters={"normalize": [True, False, True]}))
    picked = [
        resolve_values(bools.method, "global", [bools.settings], "x", t)["normalize"]
        for t in (0, 0.4, 0.5, 1)
    ]
    assert picked == [True, True, False, True]  # non-numbers are picked at int(t * (n - 1)), not interpolated
    assert parse_merge_config(_config("ties", parameters={"density": "1e-1"})).models[0].density == 0.1


def test_slices_are_read_with_their_sources_ranges_and_parameters():
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "org/a", "layer_range": [0, 3], "parameters": {"scale": [0.0, 1.0]}}]},
            {"sources": [{"model": "org/b", "layer_range": [1, 4]}], "parameters": {"scale": 2}},
        ],
    }
    parsed = parse_merge_config(config)
    assert parsed.models == [] and [s.num_layers for s in parsed.slices] == [3, 3]
    assert parsed.slices[0].sources[0].settings == {"scale": (0.0, 1.0)} and parsed.slices[1].settings == {
        "scale": 2.0
    }
    assert parsed.referenced_models == ["org/a", "org/b"]
    again = parse_merge_config(yaml.safe_load(parsed.to_mergekit_yaml()))
    assert again.slices == parsed.slices


@pytest.mark.parametrize(
    ("edit", "key", "says"),
    [
        (lambda c: c.update(random_seed=True), "random_seed", "expected an integer, got True"),
        (lambda c: c.update(random_seed=0.5), "random_seed", "expected an integer, got 0.5"),
        (
            lambda c: c.update(trust_remote_code="yes"),
            "trust_remote_code",
            "expected true or false, got 'yes'",
        ),
        (lambda c: c.update(dtype=16), "dtype", "16 is not one of float32, float16, bfloat16"),
        (lambda c: c.update(models=[]), "models", "non-empty list"),
        (lambda c: c["models"].append(7), "models[2]", "expected `model: <path>`"),
        (lambda c: c["models"][1].update(model="org/a"), "models[1].model", "listed twice"),
        (
            lambda c: c.update(slices=[{"sources": [{"model": "org/a", "layer_range": [0, 2]}]}]),
            "models",
            "not both",
        ),
        (lambda c: c.update(modules={"text": {}}), "modules", "not supported: module-wise"),
        (lambda c: c.update(tokenizer_source="base", tokenizer={}), "tokenizer", "not both"),
        (lambda c: c.update(tokenizer_source="org/other"), "tokenizer_source", "none of base, union"),
        (lambda c: c.update(chat_template="vicuna"), "chat_template", "paste the Jinja template"),
        (
            lambda c: c["models"][0].update(parameters={"weight": [0.5, "x"]}),
            "models[0].parameters.weight",
            "number",
        ),
        (
            lambda c: c.update(parameters={"density": [{"filter": "mlp", "value": 1.5}]}),
            "parameters.density",
            "out of range",
        ),
        (
            lambda c: c.update(parameters={"density": {"filter": "mlp"}}),
            "parameters.density",
            "a filtered value is",
        ),
    ],
)
def test_wrong_values_name_the_key_what_was_given_and_what_is_allowed(edit, key, says):
    config = _config("ties")
    edit(config)
    with pytest.raises(ExpertMergeError) as caught:
        parse_merge_config(config, "cfg.yaml")
    message = str(caught.value)
    assert message.startswith(f"cfg.yaml: key '{key}': ") and says in message, message


def test_several_problems_report_the_first_and_count_the_others():
    config = _config("ties", foo=1, random_seed="x", dtype="int4", chat_template=3)
    with pytest.raises(ExpertMergeError, match=r"key 'dtype'.*\(2 more problems in this file\.\)"):
        parse_merge_config(config, "cfg.yaml")


def test_linear_is_mergekits_name_for_average():
    assert parse_merge_config(_config("linear")).merge_method == "average" == get_method("linear").name
