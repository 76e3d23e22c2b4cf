"""Demo model zoos and corpus builders, kept outside the core library.

The zoos plug into `zoo://<name>/...` through the `expertmerge.zoos` entry points (see pyproject.toml and
`expertmerge.zoo_registry`); the core never imports this package.

- `tiny`: a 2-layer Llama and three synthetic-task experts, trained from scratch in minutes (`tiny.py`),
- `smollm2`: SmolLM2-135M-Instruct and math / code / French experts fine-tuned on a CPU (`smollm2.py`),
- `skills`: zoo C, SmolLM2-135M-Instruct and units / dates / caps skill experts whose short answers are scored
  by generation, with prompt-only calibration splits (`skills.py`),
- `corpora`: the generators of the shipped calibration corpora (`calib_data/corpora/*.jsonl`) and the
  GSM-Symbolic / code records the SmolLM2 zoo trains on,
- `training`, `staging`, `splits`, `evaluation`: what both zoos share (one training loop, one atomic
  build folder, disjoint data splits, held-out losses and task-vector statistics).
"""
