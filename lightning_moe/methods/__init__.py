"""LightningModules: one file per method, common machinery in base.py."""

from .base import AuxLossConfig, BackboneConfig, MultimodalMethod, StepOutput, load_backbone
from .moe_tuning import MoETuning
from .mole import ExpertOptions, LoRAOptions, LoRATuning, MoLE

__all__ = ["AuxLossConfig", "BackboneConfig", "MultimodalMethod", "StepOutput", "load_backbone", "MoETuning",
           "ExpertOptions", "LoRAOptions", "LoRATuning", "MoLE"]
