"""expertmerge: learn how to merge expert LLMs fine-tuned from one base, and export the result."""

from expertmerge.errors import ExpertMergeError
from expertmerge.moe.sequence import register as _register_models

_register_models()  # `AutoModelForCausalLM.from_pretrained` loads exported sequence-MoE folders

__all__ = ["ExpertMergeError"]
__version__ = "0.1.0"
