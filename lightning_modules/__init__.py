"""LightningModules and callbacks of expertmerge.

`ExpertMergingModule` is imported on first use, so importing this package does not start Lightning.
"""

from __future__ import annotations

from expertmerge.lazy import lazy_exports

__all__ = ["ExpertMergingModule"]


__getattr__, __dir__ = lazy_exports(__name__, {"ExpertMergingModule": "lightning_modules.merging"})
