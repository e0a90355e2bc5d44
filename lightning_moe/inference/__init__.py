"""Inference for trained sparse models: KV-cache generation and EdgeMoE expert offloading.

- `generation`: greedy / sampled generation for `MultimodalLM` with a KV cache, timed per phase.
- `quantize`: channel-wise int8 / int4 / int2 (packed) quantisation of expert weights.
- `store`: export a model into resident weights + one safetensors file per expert + a manifest.
- `cache`: the byte-budgeted expert cache (LRU, frequency-plus-layer-distance eviction).
- `offload`: `OffloadedSparseMoE` and the `ExpertOffloader` (cache, prefetch thread, counters).
- `prefetch`: routing profiles and the next-layer expert predictor.
- `plan`: expert-wise bitwidth planning against a quality tolerance.
Commands: `python -m lightning_moe.inference {export,profile,plan,generate} --help`.

Imports models/ and layers/ (never Lightning or methods/), as DESIGN.md lays out.
"""

from .cache import CACHE_POLICIES, ExpertCache
from .generation import GenerationConfig, GenerationOutput, generate
from .offload import BufferPool, ExpertOffloader, OffloadedSparseMoE, OffloadStats, load_offloaded, offload, resident_bytes
from .plan import BitwidthPlan, PlanConfig, exact_match_quality, plan_bitwidths, token_agreement_quality
from .prefetch import ExpertPredictor, RoutingProfile, profile_routing
from .quantize import QuantizedTensor, dequantize, fake_quantize, quantize
from .store import ExpertStore, StoreError, apply_bits, export_store, load_resident_model

__all__ = [
    "CACHE_POLICIES", "ExpertCache", "GenerationConfig", "GenerationOutput", "generate", "BufferPool", "ExpertOffloader",
    "OffloadedSparseMoE", "OffloadStats", "load_offloaded", "offload", "resident_bytes", "BitwidthPlan",
    "PlanConfig", "exact_match_quality", "plan_bitwidths", "token_agreement_quality", "ExpertPredictor",
    "RoutingProfile", "profile_routing", "QuantizedTensor", "dequantize", "fake_quantize", "quantize",
    "ExpertStore", "StoreError", "apply_bits", "export_store", "load_resident_model",
]
