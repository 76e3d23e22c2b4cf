"""benchmarks/paired.py's bootstrap: the measured round is quality.py's gain, and the draw is paired."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paired import bootstrap_gains, interval  # noqa: E402


def _per_text(sums, counts):
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def test_round_zero_is_the_token_weighted_gain_and_same_models_differ_by_zero():
    counts = [10, 30, 20]
    per_model = {
        "base": {"t": _per_text([30.0, 60.0, 50.0], counts)},  # 140 / 60 nats per token
        "expert t": {"t": _per_text([20.0, 40.0, 30.0], counts)},  # 90 / 60
        "a": {"t": _per_text([25.0, 45.0, 40.0], counts)},  # 110 / 60
        "b": {"t": _per_text([25.0, 45.0, 40.0], counts)},
    }
    gains = bootstrap_gains(per_model, ["t"], rounds=500)
    assert abs(float(gains["a"]["t"][0]) - (140 - 110) / (140 - 90)) < 1e-12  # 0.6, not a mean of ratios
    assert gains["a"]["t"].shape == (500,)
    assert torch.equal(gains["a"]["t"], gains["b"]["t"])  # the same texts in every round for every model
    measured, low, high = interval(gains["a"]["t"] - gains["b"]["t"])
    assert measured == low == high == 0.0
    # The rounds do resample: the gain varies between rounds, and its interval holds the measured value.
    value, low, high = interval(gains["a"]["t"])
    assert low < value < high and float(gains["a"]["t"].std()) > 0.01
