"""LightningModules: one file per method, common machinery in base.py."""

from .base import AuxLossConfig, BackboneConfig, MultimodalMethod, Stage, StepOutput
from .distill import MimicConfig, MoDDistillation, PreferenceConfig
from .continual import Continual, ContinualLoRA, TaskLoop
from .moe_tuning import MoETuning
from .lora import LoRAOptions, LoRATuning
from .mole import ExpertOptions, MoLE
from .mora import MoRAContinual, MoRAOptions
from .unimoe import AffinityLoss, ModalityExpertsConfig, UniMoE, UniMoELoRA

__all__ = ["AuxLossConfig", "BackboneConfig", "MultimodalMethod", "Stage", "StepOutput", "MoETuning",
           "ExpertOptions", "LoRAOptions", "LoRATuning", "MoLE", "Continual", "TaskLoop", "ContinualLoRA",
           "MoRAContinual", "MoRAOptions", "MoDDistillation", "MimicConfig", "PreferenceConfig", "UniMoE", "UniMoELoRA", "AffinityLoss",
           "ModalityExpertsConfig"]
