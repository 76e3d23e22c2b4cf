"""Sequence-level MoE (MergeME): whole experts routed once per request, by perplexity or a learned router,
and experts of different widths, depths and families joined through projectors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_settings
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from expertmerge.cli import main
from expertmerge.errors import ExpertMergeError
from expertmerge.moe.sequence import SequenceMoEForCausalLM  # the import registers it with the Auto classes
from expertmerge.moe.sequence_build import REMOTE_CODE_FILE, build_sequence_moe

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "sequence_moe_tiny.yaml")
TASKS = ("arith", "reverse", "sort")


def heldout_texts(zoo: Path, task: str, count: int) -> list[str]:
    lines = (zoo / "data" / f"{task}_heldout.jsonl").read_text().splitlines()[:count]
    return [json.loads(line)["text"] for line in lines]


def expert_dirs(zoo: Path, names=TASKS) -> dict[str, str]:
    return {name: str(zoo / "experts" / name) for name in names}


@pytest.fixture(scope="module")
def own_moe(tiny_zoo: Path) -> SequenceMoEForCausalLM:
    return build_sequence_moe(expert_dirs(tiny_zoo))


def test_forcing_one_expert_reproduces_that_experts_logits_exactly(tiny_zoo: Path, own_moe) -> None:
    assert own_moe.config.embeddings == "own"  # same architecture: each expert keeps its embedding and head
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "tokenizer")
    batch = tokenizer([heldout_texts(tiny_zoo, t, 1)[0] for t in TASKS], return_tensors="pt", padding=True)
    for index, (name, path) in enumerate(expert_dirs(tiny_zoo).items()):
        expert = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            reference = expert(**batch).logits
            forced = own_moe(**batch, expert_index=index, use_cache=False).logits
        assert torch.equal(forced, reference), name


def test_generate_runs_only_the_chosen_experts_and_matches_each_expert(tiny_zoo: Path, own_moe) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "tokenizer")
    prompts = [heldout_texts(tiny_zoo, t, 1)[0][:9] for t in TASKS]  # one prompt per task, same length
    batch = tokenizer(prompts, return_tensors="pt")
    with torch.no_grad():
        first = own_moe(**batch, use_cache=True)
    assert first.cache.rows.keys() == {0, 1, 2} and [r.tolist() for r in first.cache.rows.values()] == [
        [0],
        [1],
        [2],
    ]
    assert all(
        cache.get_seq_length() == batch.input_ids.shape[1] for cache in first.cache.expert_caches.values()
    )
    # each expert's KV cache holds only the request routed to it
    assert all(layer.keys.shape[0] == 1 for c in first.cache.expert_caches.values() for layer in c.layers)
    generated = own_moe.generate(**batch, max_new_tokens=12, do_sample=False)
    for row, (name, path) in enumerate(expert_dirs(tiny_zoo).items()):
        expert = AutoModelForCausalLM.from_pretrained(path).eval()
        alone = expert.generate(batch.input_ids[row : row + 1], max_new_tokens=12, do_sample=False)
        assert torch.equal(generated[row], alone[0]), name


def test_two_experts_per_request_mix_their_next_token_distributions(tiny_zoo: Path, own_moe) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "tokenizer")
    batch = tokenizer(heldout_texts(tiny_zoo, "sort", 2), return_tensors="pt", padding=True)
    weights = torch.tensor([[0.7, 0.0, 0.3], [0.0, 0.5, 0.5]])
    with torch.no_grad():
        mixed = own_moe(**batch, routing_weights=weights, use_cache=False).logits
        probs = [own_moe(**batch, expert_index=k, use_cache=False).logits.softmax(-1) for k in range(3)]
    expected = sum(weights[:, k].view(-1, 1, 1) * probs[k] for k in range(3))
    assert torch.allclose(mixed.exp(), expected, atol=1e-6)


def test_perplexity_routing_needs_no_training_and_prefers_the_prompt_s_expert(
    tiny_zoo: Path, own_moe
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "tokenizer")
    hits = total = 0
    for index, task in enumerate(TASKS):
        batch = tokenizer(heldout_texts(tiny_zoo, task, 16), return_tensors="pt", padding=True)
        weights = own_moe.routing(batch.input_ids, batch.attention_mask)
        assert torch.allclose(weights.sum(1), torch.ones(len(weights)))
        assert ((weights > 0).sum(1) == 1).all()  # top-1
        hits += int((weights.argmax(1) == index).sum())
        total += len(weights)
    assert hits / total >= 0.9


def run_fit(tmp: Path, name: str, *overrides: str, config: str = CONFIG) -> Path:
    out = tmp / name
    code = main(
        [
            "fit",
            "--config",
            config,
            "--export.output_dir",
            str(out),
            "--trainer.default_root_dir",
            str(tmp / f"{name}-logs"),
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            *overrides,
        ]
    )
    assert code == 0
    return out


def test_fit_trains_the_learned_router_reports_routing_and_exports_a_loadable_model(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    folder = run_fit(tmp_path, "seq", "--model.init_args.router", "learned", "--trainer.max_steps", "30")
    routing = json.loads((folder / "routing.json").read_text())
    for router in ("perplexity", "learned"):
        for part in ("whole sample", "first half"):
            per_task = routing[router][part]
            assert sum(per_task.values()) / len(per_task) >= 0.9, (router, part, per_task)
    learned = routing["learned"]["whole sample"]
    assert sum(learned.values()) >= sum(routing["perplexity"]["whole sample"].values())
    scores = json.loads((folder / "eval.json").read_text())
    moe_kl = sum(s["kl"] for s in scores["sequence MoE (learned router)"].values()) / 3
    best_single = min(sum(s["kl"] for s in scores[f"expert {n} alone"].values()) / 3 for n in TASKS)
    assert moe_kl < 0.1 * best_single
    card = (folder / "README.md").read_text()
    assert '"router": "learned"' in card and '"top_k": 1' in card and "Routing accuracy" in card

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # its module registered it on import
    assert isinstance(model, SequenceMoEForCausalLM) and model.config.router == "learned"
    assert model.router.weight.abs().sum() > 0  # the trained router was saved
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer([heldout_texts(tiny_zoo, "reverse", 1)[0][:8]], return_tensors="pt")
    assert model.routing(prompt.input_ids, prompt.attention_mask).argmax(1).item() == 1
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt.input_ids.shape[1] + 6

    # Where expertmerge is not installed, the folder's own copy of the modeling code loads it.
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "assert 'expertmerge' not in sys.modules, 'expertmerge was imported'; "
        "print(type(m).__module__, m(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False).logits.shape)"
    )
    assert (folder / REMOTE_CODE_FILE).is_file()
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert REMOTE_CODE_FILE.removesuffix(".py") in done.stdout and "torch.Size([1, 3, 259])" in done.stdout


# ------------------------------------------------------------------------------- heterogeneous experts


def train_small_qwen_expert(zoo: Path, out: Path, task: str = "sort", steps: int = 300) -> Path:
    """A different family, width and depth (Qwen2, hidden 32, 3 layers) trained from scratch on one task,
    with the zoo's tokenizer: the kind of expert mergekit refuses to merge with a 2-layer, 64-wide Llama."""
    tokenizer = AutoTokenizer.from_pretrained(zoo / "tokenizer")
    config = Qwen2Config(
        **tiny_model_settings(
            vocab_size=len(tokenizer),
            intermediate_size=96,
            num_hidden_layers=3,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    texts = [
        json.loads(line)["text"] for line in (zoo / "data" / f"{task}_train.jsonl").read_text().splitlines()
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(len(texts), (16,), generator=generator).tolist()
        batch = tokenizer(
            [texts[r] for r in rows], return_tensors="pt", padding=True, truncation=True, max_length=64
        )
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_experts_of_different_width_depth_and_family_are_joined_through_trained_projectors(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    small = train_small_qwen_expert(tiny_zoo, tmp_path / "qwen-sort")
    config = tmp_path / "hetero.yaml"
    config.write_text(
        "model:\n"
        "  class_path: lightning_modules.sequence_moe.SequenceMoEModule\n"
        "  init_args:\n"
        f"    experts: {{arith: {tiny_zoo / 'experts' / 'arith'}, sort: {small}}}\n"
        "    projector_lr: 0.01\n"
        "data:\n"
        "  tasks:\n"
        "    - {name: arith, expert: arith, sources: [zoo://tiny/data/arith_calib.jsonl]}\n"
        "    - {name: sort, expert: sort, sources: [zoo://tiny/data/sort_calib.jsonl]}\n"
        "  samples_per_task: 32\n"
        "  eval_samples_per_task: 16\n"
        "  max_length: 64\n"
        "  batch_size: 8\n"
        "trainer: {max_steps: 80, limit_val_batches: 0}\n"
    )
    folder = run_fit(tmp_path, "hetero", config=str(config))
    scores = json.loads((folder / "eval.json").read_text())

    def mean_kl(row: str) -> float:
        return sum(s["kl"] for s in scores[row].values()) / len(scores[row])

    joined = mean_kl("sequence MoE (perplexity router)")
    assert joined < mean_kl("expert arith alone") and joined < mean_kl("expert sort alone")
    assert joined < 0.5 * min(mean_kl("expert arith alone"), mean_kl("expert sort alone"))
    assert "projector_sizes" in (folder / "README.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.embeddings == "shared" and model.expert_widths == [64, 32]
    assert tuple(model.input_projectors[1].weight.shape) == (32, 64)
    assert torch.equal(
        model.input_projectors[0].weight, torch.eye(64)
    )  # the widest expert reads the shared space as is
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer([heldout_texts(tiny_zoo, "sort", 1)[0][:10]], return_tensors="pt")
    assert model.routing(prompt.input_ids, prompt.attention_mask).argmax(1).item() == 1
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt.input_ids.shape[1] + 6


def test_experts_with_different_tokenizers_are_refused_naming_the_expert(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_zoo / "experts" / "sort", other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ExpertMergeError, match=r"Expert 'sort'.*different tokenizer.*vocabulary alignment"):
        build_sequence_moe({"arith": str(tiny_zoo / "experts" / "arith"), "sort": str(other)})


def test_bad_settings_fail_before_any_work(tiny_zoo: Path) -> None:
    from lightning_modules.sequence_moe import SequenceMoEModule

    experts = expert_dirs(tiny_zoo)
    with pytest.raises(ExpertMergeError, match="model.top_k"):
        SequenceMoEModule(experts, top_k=4)
    with pytest.raises(ExpertMergeError, match="model.router"):
        SequenceMoEModule(experts, router="random")
    with pytest.raises(ExpertMergeError, match="at least two experts"):
        build_sequence_moe({"arith": experts["arith"]})
    with pytest.raises(ExpertMergeError, match="model.embeddings"):
        build_sequence_moe(experts, embeddings="tied")


def test_export_from_a_fit_checkpoint_writes_the_trained_router(tiny_zoo: Path, tmp_path: Path) -> None:
    folder = run_fit(
        tmp_path,
        "fit",
        "--model.init_args.router",
        "learned",
        "--trainer.max_steps",
        "6",
        "--trainer.enable_checkpointing",
        "true",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(tmp_path / "checkpoints"),
        "--trainer.callbacks.every_n_train_steps",
        "6",
        "--export.evaluate",
        "false",
    )
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert set(stored) == {"model.router.weight", "model.router.bias"}  # only what the fit trains
    again = tmp_path / "again"
    assert main(["export", "--config", CONFIG, "--ckpt_path", str(checkpoint), "--out", str(again)]) == 0
    first = AutoModelForCausalLM.from_pretrained(folder)
    second = AutoModelForCausalLM.from_pretrained(again)
    assert torch.equal(first.router.weight, second.router.weight) and first.router.weight.abs().sum() > 0
    assert torch.equal(first.experts[2].lm_head.weight, second.experts[2].lm_head.weight)


def test_experts_with_tied_embeddings_reload_exactly(tmp_path: Path) -> None:
    """SmolLM2-style experts tie lm_head to the embedding; the saved MoE must re-tie them on load."""
    from conftest import perturbed, save_model, tiny_llama, tiny_tokenizer

    base = tiny_llama(seed=3, tie_word_embeddings=True)
    folders = {
        name: save_model(perturbed(base, seed), tmp_path / name, tokenizer=tiny_tokenizer())
        for name, seed in (("one", 1), ("two", 2))
    }
    save = tmp_path / "moe"
    build_sequence_moe({k: str(v) for k, v in folders.items()}).save_pretrained(save)
    reloaded = AutoModelForCausalLM.from_pretrained(save).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    for index, folder in enumerate(folders.values()):
        expert = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            expected = expert(input_ids=ids).logits
            got = reloaded(input_ids=ids, expert_index=index, use_cache=False).logits
        assert torch.equal(got, expected)


def test_fit_with_a_missing_expert_folder_names_it_and_writes_nothing(
    tiny_zoo: Path, tmp_path: Path, capsys
) -> None:
    code = main(
        [
            "fit",
            "--config",
            CONFIG,
            "--model.init_args.experts",
            f"{{arith: {tmp_path / 'nowhere'}, sort: zoo://tiny/experts/sort}}",
            "--export.output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    printed = "".join(capsys.readouterr().err.split())  # rich wraps long lines, even inside a long path
    assert f"expert'arith'({tmp_path / 'nowhere'}):folder" in printed and "doesnotexist" in printed
    assert not (tmp_path / "out").exists()
