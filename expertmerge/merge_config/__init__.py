"""The `merge` YAML (mergekit's format): its typed schema, checked before any model is opened, and the merge plan.

```yaml
merge_method: ties                 # see `expertmerge.methods.METHODS`; `linear` = average
base_model: path/or/org-name       # needed by every method but `average` and `passthrough`
models:                            # or `slices:` (below), not both
  - model: path/to/expert_a
    parameters: {weight: [0.2, 1.0], density: [{filter: mlp, value: 0.5}, {value: 1.0}]}
parameters: {normalize: true, lambda: 1.0, rescale: true, int8_mask: false, weight: 1.0, density: 1.0}
slices:                            # layer ranges: same-range merges, or passthrough stacks that change depth
  - sources:
      - {model: path/a, layer_range: [0, 2], parameters: {scale: 0.5}}
    parameters: {...}              # the slice's defaults (between a source's and the top level's)
dtype: bfloat16                    # the precision inputs are read in (mergekit's meaning)
out_dtype: float32                 # the output's dtype (default: dtype, else the base's stored dtype)
tokenizer_source: base             # base | union | <model>; or tokenizer: {source, tokens, pad_to_multiple_of}
chat_template: auto                # auto (the most common among the models) | alpaca, chatml, exaone, llama3, mistral | a Jinja template
random_seed: 0                     # random drop masks (`seed` is accepted too)
```

Two layers: `MergeYAML` (pydantic) types the file's structure; the chosen method's declared `Parameter`s then
check every `parameters:` value (each scalar of a gradient or filter list; see `expertmerge.methods.settings`).
Errors name the file, the key path (`models[1].parameters.density`), what was given and what is allowed.
A key mergekit accepts and ignores (an unknown key, a parameter the method does not read) is a warning in
`MergeConfig.warnings`, so a config mergekit runs runs here. Our additions: `include` / `exclude` (regular
expressions choosing the merged tensors), `trust_remote_code` and `output_dir`.

Files: `schema` (the file's structure, pydantic), `parse` (each value checked against the chosen method: a
`MergeConfig`), `resolved` (`MergeConfig` and its entries), `slices` (the plan: each output tensor's inputs).
The merge methods themselves (`expertmerge.methods`) are pure tensor code and import nothing from here.
"""
