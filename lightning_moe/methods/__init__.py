"""LightningModules: one file per method, common machinery in base.py."""

from .base import AuxLossConfig, BackboneConfig, MultimodalMethod, StepOutput, load_backbone
from .continual import ContinualLoRA, ContinualMethod
from .moe_tuning import MoETuning
from .mora import MoRAContinual

__all__ = ["AuxLossConfig", "BackboneConfig", "MultimodalMethod", "StepOutput", "load_backbone", "MoETuning",
           "ContinualMethod", "ContinualLoRA", "MoRAContinual"]
