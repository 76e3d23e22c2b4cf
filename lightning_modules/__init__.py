"""LightningModules and callbacks of expertmerge."""

from lightning_modules.merging import ExpertMergingModule

__all__ = ["ExpertMergingModule"]
