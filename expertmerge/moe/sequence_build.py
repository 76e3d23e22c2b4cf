"""Build a `SequenceMoEForCausalLM` from expert folders, check what can be joined, and export it.

Experts may differ in width, depth and family; they must share a tokenizer (same token ids), because the
mixture's next-token distributions are over one vocabulary. Vocabulary alignment is out of scope: experts
with different tokenizers are refused with the file that differs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from expertmerge.errors import ExpertMergeError
from expertmerge.io.card import write_merge_card
from expertmerge.io.folder import atomic_output_dir
from expertmerge.io.reader import nonfinite_count
from expertmerge.io.tokenizer_ids import TOKENIZER_FILES, tokenizer_json_ids
from expertmerge.moe import sequence
from expertmerge.moe.sequence import SequenceMoEConfig, SequenceMoEForCausalLM

REMOTE_CODE_FILE = "modeling_sequence_moe.py"


def _load_config(name: str, path: str, trust_remote_code: bool) -> Any:
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ExpertMergeError(
            f"Expert '{name}': cannot read a model config from '{path}' ({error})."
        ) from error


def _token_ids(path: str) -> Any:
    """What the tokenizer's files map (token -> id). From `tokenizer.json` when there is one: loading it
    through `AutoTokenizer` can add a family's special tokens (a Qwen2 config adds `<|endoftext|>`)."""
    if (Path(path) / "tokenizer.json").is_file():
        vocab, added = tokenizer_json_ids(Path(path) / "tokenizer.json")
        return {**(vocab or {}), **{content: index for content, index in added}}
    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError, TypeError) as error:
        raise ExpertMergeError(f"Cannot load the tokenizer of '{path}' ({error}).") from error


def check_joinable(experts: Mapping[str, str], trust_remote_code: bool = False) -> dict[str, Any]:
    """Configs of the experts, after checking they are causal LMs with one shared vocabulary."""
    if len(experts) < 2:
        raise ExpertMergeError("A sequence MoE needs at least two experts under `model.experts`.")
    configs = {name: _load_config(name, path, trust_remote_code) for name, path in experts.items()}
    sizes = {name: config.get_text_config().vocab_size for name, config in configs.items()}
    if len(set(sizes.values())) > 1:
        raise ExpertMergeError(
            f"The experts' vocabularies differ in size ({sizes}); a sequence MoE joins experts that share a "
            "tokenizer (vocabulary alignment is not supported)."
        )
    reference, first = None, None
    for name, path in experts.items():
        if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            continue  # an expert without tokenizer files is assumed to use the others'
        ids = _token_ids(path)
        if reference is None:
            reference, first = ids, name
        elif ids != reference:
            different = sorted(set(ids.items()) ^ set(reference.items()))[:3]
            raise ExpertMergeError(
                f"Expert '{name}' ({path}) has a different tokenizer from expert '{first}' (e.g. {different}); "
                "a sequence MoE needs experts that share a tokenizer (vocabulary alignment is not supported)."
            )
    return configs


def _architecture(config: Any) -> tuple:
    text = config.get_text_config()
    return (
        config.model_type,
        text.hidden_size,
        text.num_hidden_layers,
        getattr(text, "intermediate_size", None),
    )


def resolve_embeddings(embeddings: str, configs: Mapping[str, Any]) -> str:
    """`auto`: each expert keeps its own embedding and head (exact) when all share one architecture;
    otherwise one shared embedding and head with per-expert projectors (MergeME's heterogeneous join)."""
    if embeddings not in ("auto", *sequence.EMBEDDINGS):
        raise ExpertMergeError(f"model.embeddings must be auto, own or shared, not '{embeddings}'.")
    if embeddings != "auto":
        return embeddings
    return "own" if len({_architecture(c) for c in configs.values()}) == 1 else "shared"


def _least_squares(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """W [d_target, d_source] minimising |source W^T - target| (rows are tokens), solved in float64."""
    solution = torch.linalg.lstsq(source.double(), target.double(), driver="gelsd").solution
    return solution.T.to(torch.float32)


def _join_shared(model: SequenceMoEForCausalLM, loaded: list[Any], widths: list[int], anchor: int) -> None:
    """MergeME's heterogeneous join: the anchor's embedding and head shared by all, each expert's backbone between
    an input and an output projector fitted by least squares to its own embedding and head."""
    shared_in = loaded[anchor].get_input_embeddings().weight.detach()
    shared_out = loaded[anchor].get_output_embeddings().weight.detach()
    model.embed_tokens = torch.nn.Embedding.from_pretrained(shared_in.clone(), freeze=False)
    model.lm_head = torch.nn.Linear(widths[anchor], model.config.vocab_size, bias=False)
    model.lm_head.weight = torch.nn.Parameter(shared_out.clone())
    backbones, inputs, outputs = [], [], []
    for index, expert in enumerate(loaded):
        width = widths[index]
        own_in = expert.get_input_embeddings().weight.detach()
        own_out = expert.get_output_embeddings().weight.detach()
        into, out_of = (
            torch.nn.Linear(widths[anchor], width, bias=False),
            torch.nn.Linear(width, widths[anchor], bias=False),
        )
        with torch.no_grad():
            if index == anchor:
                into.weight.copy_(torch.eye(width))
                out_of.weight.copy_(torch.eye(width))
            else:
                into.weight.copy_(_least_squares(shared_in, own_in))
                # The shared head reads W_out h as the expert's head reads h: shared_out W_out ~ own_out.
                out_of.weight.copy_(_least_squares(shared_out, own_out).T)
        backbone = expert.get_decoder() if hasattr(expert, "get_decoder") else expert.base_model
        backbone.set_input_embeddings(torch.nn.Embedding(1, width))
        backbones.append(backbone)
        inputs.append(into)
        outputs.append(out_of)
    model.experts = torch.nn.ModuleList(backbones)
    model.input_projectors = torch.nn.ModuleList(inputs)
    model.output_projectors = torch.nn.ModuleList(outputs)


def build_sequence_moe(
    experts: Mapping[str, str],
    embeddings: str = "auto",
    router: str = "perplexity",
    top_k: int = 1,
    trust_remote_code: bool = False,
    console: Console | None = None,
) -> SequenceMoEForCausalLM:
    """The model, in float32, with every expert's weights loaded (one expert read at a time)."""
    configs = check_joinable(experts, trust_remote_code)
    mode = resolve_embeddings(embeddings, configs)
    names = list(experts)
    widths = [configs[n].get_text_config().hidden_size for n in names]
    anchor = max(range(len(names)), key=lambda i: (widths[i], -i))  # the widest, first among equals
    anchor_text = configs[names[anchor]].get_text_config()
    config = SequenceMoEConfig(
        expert_configs=[configs[n].to_dict() for n in names],
        expert_names=names,
        embeddings=mode,
        router=router,
        router_top_k=top_k,
        hidden_size=widths[anchor],
        vocab_size=anchor_text.vocab_size,
        router_expert=anchor,
        pad_token_id=anchor_text.pad_token_id,
        bos_token_id=anchor_text.bos_token_id,
        eos_token_id=anchor_text.eos_token_id,
    )
    with torch.device("meta"):
        model = SequenceMoEForCausalLM(config)
    loaded = [
        AutoModelForCausalLM.from_pretrained(
            experts[n], dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()
        for n in names
    ]
    if mode == "own":
        model.experts = torch.nn.ModuleList(loaded)
    else:
        _join_shared(model, loaded, widths, anchor)
    model.router = torch.nn.Linear(model.router.in_features, len(names))
    torch.nn.init.zeros_(model.router.weight)
    torch.nn.init.zeros_(model.router.bias)
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [
        n for n, b in model.named_buffers() if b.is_meta
    ]
    if leftover:
        raise RuntimeError(f"sequence MoE build left tensors unset: {leftover[:5]}")
    if console is not None:
        console.print(
            f"sequence MoE: {len(names)} experts ({escape(', '.join(names))}), embeddings '{mode}', router '{router}', "
            f"top-{top_k}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
        )
    return model.eval()


def projector_sizes(model: SequenceMoEForCausalLM) -> dict[str, list[int]]:
    if model.config.embeddings != "shared":
        return {}
    return {
        name: [model.config.hidden_size, width]
        for name, width in zip(model.config.expert_names, model.expert_widths, strict=True)
    }


def export_sequence_moe(
    model: SequenceMoEForCausalLM,
    out: str | Path,
    force: bool,
    tokenizer: Any,
    experts: Mapping[str, tuple[str, str]],
    parameters: Mapping[str, Any],
    sections: Mapping[str, str] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write the model folder atomically: weights, config (with `auto_map` to the copied modeling file, for
    `trust_remote_code=True` without expertmerge), tokenizer, merge card and `extra_files` (name -> text)."""
    # save_pretrained knows this class's tied weights; the values are checked first (in memory, no file read).
    for name, tensor in model.state_dict().items():
        bad = nonfinite_count(tensor)
        if bad:
            raise ExpertMergeError(
                f"output tensor '{name}' holds {bad} NaN/Inf value(s) of {tensor.numel()}; nothing was written."
            )
    sources = [source for source, _ in experts.values()]
    with atomic_output_dir(out, force, inputs=sources, command="sequence_moe") as tmp:
        model.save_pretrained(tmp)
        shutil.copyfile(sequence.__file__, tmp / REMOTE_CODE_FILE)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        stem = REMOTE_CODE_FILE.removesuffix(".py")
        config["auto_map"] = {
            "AutoConfig": f"{stem}.SequenceMoEConfig",
            "AutoModelForCausalLM": f"{stem}.SequenceMoEForCausalLM",
        }
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(tmp)
        write_merge_card(
            tmp,
            title="Sequence-level mixture of experts",
            method=f"sequence_moe (router {model.config.router}, top-{model.config.router_top_k})",
            base=None,
            experts=experts,
            parameters={
                "router": model.config.router,
                "top_k": model.config.router_top_k,
                "embeddings": model.config.embeddings,
                "projector_sizes": projector_sizes(model),
                **parameters,
            },
            sections=sections,
        )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)
