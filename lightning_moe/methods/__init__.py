"""LightningModules: one file per method, common machinery in base.py."""

from .base import AuxLossConfig, BackboneConfig, MultimodalMethod, StepOutput, load_backbone
from .distill import MimicConfig, MoDDistillation, PreferenceConfig
from .moe_tuning import MoETuning

__all__ = ["AuxLossConfig", "BackboneConfig", "MultimodalMethod", "StepOutput", "load_backbone", "MoETuning", "MoDDistillation",
           "MimicConfig", "PreferenceConfig"]
