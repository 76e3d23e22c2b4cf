"""expertmerge: learn how to merge expert LLMs fine-tuned from one base, and export the result.

Importing a package of expertmerge has no side effects and loads neither torch nor transformers; the modules
that need them import them. To load an exported sequence MoE with `AutoModelForCausalLM.from_pretrained`,
`import expertmerge.moe.sequence` first (it registers the model type), or pass `trust_remote_code=True`.
"""

from expertmerge.errors import ExpertMergeError

__all__ = ["ExpertMergeError"]
__version__ = "0.1.0"
