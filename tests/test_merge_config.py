"""The merge YAML schema against the methods' declared parameters (no model is opened: sources are hub ids)."""

from __future__ import annotations

import pytest
import yaml

from expertmerge.errors import ExpertMergeError
from expertmerge.methods import METHODS, get_method
from expertmerge.methods.config import parse_merge_config


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


def test_another_methods_parameter_is_accepted_only_at_its_no_effect_value():
    assert (
        parse_merge_config(_config("task_arithmetic", parameters={"density": 1.0})).models[0].density == 1.0
    )
    assert parse_merge_config(_config("average", parameters={"lambda": 1})).parameters == {"normalize": True}
    with pytest.raises(ExpertMergeError, match=r"'parameters.int8_mask': int8_mask True has no effect.*ties"):
        parse_merge_config(_config("average", parameters={"int8_mask": True}))


@pytest.mark.parametrize(
    ("edit", "key", "says"),
    [
        (
            lambda c: c["models"][0].update(parameters={"lambda": 0.5}),
            "models[0].parameters.lambda",
            "once per merge",
        ),
        (lambda c: c.update(parameters={"densty": 0.5}), "parameters.densty", "Did you mean 'density'"),
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
        (lambda c: c.update(foo=1, bar=2), "foo", "unknown key. Known keys here: merge_method"),
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
    config = _config("ties", foo=1, random_seed="x", dtype="int4")
    with pytest.raises(ExpertMergeError, match=r"key 'foo'.*\(2 more problems in this file\.\)"):
        parse_merge_config(config, "cfg.yaml")


def test_linear_is_mergekits_name_for_average():
    assert parse_merge_config(_config("linear")).merge_method == "average" == get_method("linear").name
