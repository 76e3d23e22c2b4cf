"""The output's tokenizer and the embedding rows of its tokens: mergekit's `tokenizer_source` / `tokenizer:`.

The rules are mergekit 0.1.5's (`mergekit.tokenizer.build`, `mergekit.tokenizer.embed`):

- `base`: the base's tokenizer; `<model>`: that model's; `union`: the base's, plus every token of the other
  models that the base lacks (added in model order), plus their added tokens; `tokens:` keys are added last.
- Each model's vocabulary-indexed tensors (embeddings, lm_head) are permuted to the output's ids. A token a
  model lacks gets a row by this rule: a `tokens:` entry's source (a model's row of that token, a model's row
  of another token `{kind: model_token}`, or `{kind: zero}`); else the only model that has it; else the
  base's row, if the base is an input and has it; else the mean of the rows of the models that have it.
  `force: true` uses the rule even for models that have the token.
- `pad_to_multiple_of` pads the vocabulary; each padding row is the mean of that model's real rows.
- The config's `vocab_size` becomes the output vocabulary's size (padded).

Models whose tokenizer cannot be loaded are assumed to share the base's, as mergekit does.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.io.support import TOKENIZER_FILES

# The chat templates mergekit bundles (`chat_template: <name>`), written here: each renders its family's format.
# mergekit's own files render stray whitespace under transformers' Jinja settings (llama3: a newline after every
# <|eot_id|>; alpaca: a leading blank line without a system message; exaone: its source's indentation); these
# render the formats themselves. Any other template: paste the Jinja text, or `auto`.
CHAT_TEMPLATES = {
    "alpaca": (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{%- if system %}{{ system[-1]['content'] | trim }}{% endif -%}"
        "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}"
        "{%- set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} -%}"
        "{%- for message in turns if message['role'] in headers -%}"
        "{%- if system or not loop.first %}{{ '\n\n' }}{% endif -%}"
        "{{ headers[message['role']] + '\n' + message['content'] | trim }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and (turns | length == 0 or turns[-1]['role'] != 'assistant') -%}"
        "{{ ('\n\n' if system or turns else '') + '### Response:\n' }}"
        "{%- endif -%}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
    "exaone": (
        "{%- if messages and messages[0]['role'] != 'system' %}{{ '[|system|][|endofturn|]\n' }}{% endif -%}"
        "{%- for message in messages -%}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\n' if message['role'] == 'user' else '[|endofturn|]\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '[|assistant|]' }}{% endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
        "'<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif -%}"
    ),
    "mistral": (
        "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
        "{%- set turns = messages[1:] if has_system else messages -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('After an optional system message, roles must alternate user/assistant/user/...') }}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set system = messages[0]['content'] + '\n\n' if loop.first and turns is not sameas messages else '' -%}"
        "{{ ' [INST] ' + system + message['content'] + ' [/INST]' }}"
        "{%- else -%}"
        "{{ ' ' + message['content'] + eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
}


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


@dataclass
class Vocabulary:
    """The output tokenizer, its vocabulary, and how each model's rows map onto it (-1: the model lacks it)."""

    tokenizer: Any
    vocab: dict[str, int]
    size: int
    permutations: dict[str, list[int]]
    original_vocabs: dict[str, dict[str, int]]
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    base: str | None = None

    def is_identity(self, model: str, rows: int) -> bool:
        return self.size == rows == len(self.vocab) and self.permutations[model] == list(range(rows))

    def align(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each model's vocabulary-indexed tensor (rows = token ids) in the output's ids."""
        models = list(tensors)
        if all(self.is_identity(m, tensors[m].shape[0]) for m in models) and not self.tokens:
            return dict(tensors)
        dtype = tensors[models[0]].dtype
        for tensor in tensors.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
        shape = tensors[models[0]].shape[1:]
        perms = {m: self.permutations[m] for m in models}
        configs = dict(self.tokens)
        averaged = self._assign_sources(perms, models, configs)
        defaults: dict[str, torch.Tensor] = {}
        for token, token_id in self.vocab.items():
            rule = configs.get(token)
            forced = bool(rule and rule.get("force"))
            if not forced and all(perms[m][token_id] >= 0 for m in models):
                continue
            if token in averaged:
                present = [m for m in models if perms[m][token_id] >= 0]
                row = torch.zeros(shape, dtype=dtype)
                for model in present:
                    row = row + tensors[model][perms[model][token_id]]
                defaults[token] = row / len(present)
            elif rule is not None:
                defaults[token] = self._rule_row(tensors, perms, token, token_id, rule, shape, dtype)
        result = {}
        for model in models:
            perm, old = perms[model], tensors[model]
            new = torch.zeros((self.size, *shape), dtype=dtype)
            for token, token_id in self.vocab.items():
                forced = bool(configs.get(token, {}).get("force"))
                if perm[token_id] >= 0 and not forced:
                    new[token_id] = old[perm[token_id]]
                elif token in defaults:
                    new[token_id] = defaults[token]
            if self.size > len(self.vocab):
                new[len(self.vocab) :] = new[: len(self.vocab)].mean(dim=0)
            result[model] = new
        return result

    def _assign_sources(
        self, perms: Mapping[str, list[int]], models: Sequence[str], configs: dict[str, dict[str, Any]]
    ) -> set[str]:
        averaged = set()
        for token, token_id in self.vocab.items():
            if token in configs:
                continue
            present = [m for m in models if perms[m][token_id] >= 0]
            if len(present) == 1:
                configs[token] = {"source": present[0]}
            elif not present:
                configs[token] = {"source": {"kind": "zero"}}
            elif self.base in models and perms[self.base][token_id] >= 0:
                configs[token] = {"source": self.base}
            else:
                averaged.add(token)
        return averaged

    def _rule_row(
        self,
        tensors: Mapping[str, torch.Tensor],
        perms: Mapping[str, list[int]],
        token: str,
        token_id: int,
        rule: Mapping[str, Any],
        shape: torch.Size,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        source = rule.get("source")
        if isinstance(source, Mapping) and source.get("kind") == "zero":
            return torch.zeros(shape, dtype=dtype)
        model = source.get("model") if isinstance(source, Mapping) else source
        where = f"tokenizer.tokens.{token}.source"
        if model not in tensors:
            raise ExpertMergeError(
                f"key '{where}': token {token!r} takes its row from '{model}', which is not an input of this "
                "tensor; name one of the merged models."
            )
        if isinstance(source, Mapping):
            index = source.get("token_id")
            if index is None:
                index = self.original_vocabs[model].get(source.get("token"))
                if index is None:
                    raise ExpertMergeError(
                        f"key '{where}': {source.get('token')!r} is not in '{model}''s vocabulary."
                    )
            if not 0 <= index < tensors[model].shape[0]:
                raise ExpertMergeError(f"key '{where}': token id {index} is out of range for '{model}'.")
            return tensors[model][index]
        if perms[model][token_id] < 0:
            raise ExpertMergeError(f"key '{where}': token {token!r} is not in '{model}''s vocabulary.")
        return tensors[model][perms[model][token_id]]


def _union(base_tokenizer: Any, tokenizers: Mapping[str, Any], vocab_sizes: Mapping[str, int]) -> Any:
    """The base's tokenizer plus the other models' tokens (mergekit's `build_union_tokenizer`)."""
    from transformers import AutoTokenizer

    words: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tokenizer in tokenizers.items():
        size = vocab_sizes[model]
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < size:
                words.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:  # a copy: the base's tokenizer itself stays as it is
        base_tokenizer.save_pretrained(folder)
        result = AutoTokenizer.from_pretrained(folder)
    base_vocab = base_tokenizer.get_vocab()
    for token in words:
        if token not in added and token not in base_vocab:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def build_vocabulary(
    source: str,
    base: str,
    models: Sequence[str],
    folders: Mapping[str, Path],
    vocab_sizes: Mapping[str, int],
    tokens: Mapping[str, Mapping[str, Any]] | None = None,
    pad_to_multiple_of: int | None = None,
    trust_remote_code: bool = False,
) -> Vocabulary:
    """The output vocabulary for `source` (`base`, `union` or one of `models`), and every model's permutation."""
    base_tokenizer = load_tokenizer(folders[base], trust_remote_code)
    base_vocab = base_tokenizer.get_vocab()  # get_vocab is slow on large vocabularies: once per tokenizer
    beyond = [t for t, i in base_vocab.items() if i >= vocab_sizes[base]]
    if beyond:
        raise ExpertMergeError(
            f"key 'tokenizer': the base's tokenizer has {len(beyond)} token(s) past its vocab_size "
            f"{vocab_sizes[base]} (e.g. {beyond[0]!r}); trim its tokenizer to its embeddings first."
        )
    tokenizers = {base: base_tokenizer}
    for model in models:
        if model not in tokenizers:
            # mergekit's rule: a model whose tokenizer does not load shares the base's.
            with contextlib.suppress(Exception):
                tokenizers[model] = load_tokenizer(folders[model], trust_remote_code)
    if source == "base":
        out = base_tokenizer
    elif source == "union":
        out = _union(base_tokenizer, tokenizers, vocab_sizes)
    elif source in folders:
        out = tokenizers.get(source) or load_tokenizer(folders[source], trust_remote_code)
    else:
        raise ExpertMergeError(
            f"key 'tokenizer.source': '{source}' is none of base, union or a model of this merge; name one."
        )
    existing = set(out.get_vocab())
    for token in tokens or {}:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = out.get_vocab()
    vocabs = {m: t.get_vocab() if t is not base_tokenizer else base_vocab for m, t in tokenizers.items()}
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    permutations = {}
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(vocab))):
        raise ExpertMergeError("key 'tokenizer': the output vocabulary's ids are not 0..n-1; not supported.")
    for model in models:
        own = vocabs.get(model, base_vocab)
        limit = vocab_sizes[model]
        permutations[model] = [own[t] if t in own and own[t] < limit else -1 for t, _ in by_id]
    return Vocabulary(
        tokenizer=out,
        vocab=vocab,
        size=size,
        permutations=permutations,
        original_vocabs=vocabs,
        tokens={t: dict(c) for t, c in (tokens or {}).items()},
        base=base,
    )


def chat_template_text(name: str, folders: Mapping[str, Path], trust_remote_code: bool = False) -> str | None:
    """The Jinja template for `chat_template:` (`auto`: the most common among the models; None if none)."""
    if name == "auto":
        found: dict[str, int] = {}
        for folder in folders.values():
            try:
                template = load_tokenizer(folder, trust_remote_code).chat_template
            except Exception:  # noqa: BLE001 - a model without a loadable tokenizer has no vote
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found[template.strip()] = found.get(template.strip(), 0) + 1
        return max(found, key=found.get) if found else None
    check_chat_template(name)
    return CHAT_TEMPLATES.get(name, name)


def check_chat_template(name: str) -> None:
    """`auto`, a template we ship, or a Jinja template itself (mergekit's test: a `{` and 20+ characters)."""
    if name != "auto" and name not in CHAT_TEMPLATES and ("{" not in name or len(name) < 20):
        raise ExpertMergeError(
            f"{name!r} is not a chat template name ({', '.join([*CHAT_TEMPLATES, 'auto'])}); paste the Jinja "
            "template itself."
        )


def save_tokenizer(tokenizer: Any, folder: Path, chat_template: str | None) -> None:
    """Write `tokenizer` into `folder`, replacing any tokenizer files copied there."""
    for filename in TOKENIZER_FILES:
        (folder / filename).unlink(missing_ok=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(folder))
