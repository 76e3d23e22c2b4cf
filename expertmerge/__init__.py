"""expertmerge: learn how to merge expert LLMs fine-tuned from one base, and export the result."""

from expertmerge.errors import ExpertMergeError

__all__ = ["ExpertMergeError"]
__version__ = "0.1.0"
