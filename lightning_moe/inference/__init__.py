"""Inference for trained sparse models: KV-cache generation and EdgeMoE expert offloading.

- `generation`: greedy / sampled generation for `MultimodalLM` with a KV cache, timed per phase.
- `quantize`: channel-wise int8 / int4 / int2 (packed) quantisation of expert weights.
- `store`: export a model into resident weights + one safetensors file per expert + a manifest.
- `cache`: the byte-budgeted expert cache (LRU, frequency-plus-layer-distance eviction).
- `offload`: `OffloadedSparseMoE` and the `ExpertOffloader` (cache, prefetch thread, counters).
- `prefetch`: routing profiles and the next-layer expert predictor.
- `plan`: expert-wise bitwidth planning against a quality tolerance.
Commands: `python -m lightning_moe.edge {export,profile,plan,generate} --help` (the command layer,
`lightning_moe/edge.py`, outside this package because it reads datasets); in `main.py predict`, the
`lightning_moe.callbacks.ExpertOffloading` callback.

Imports models/, layers/ and the shared `tokens` module only (never Lightning, data/, metrics/ or
methods/), as DESIGN.md lays out; tests/inference/test_layering.py checks it.
"""

from .cache import CACHE_POLICIES, ExpertCache, cache_budget
from .generation import GenerationConfig, GenerationOutput, generate
from .offload import BufferPool, ExpertOffloader, OffloadedSparseMoE, OffloadStats, load_offloaded, offload, resident_bytes
from .plan import BitwidthPlan, PlanConfig, exact_match_quality, plan_bitwidths, token_agreement_quality
from .prefetch import PROFILE_NAME, ExpertPredictor, RoutingProfile, profile_routing
from .quantize import QuantizedTensor, dequantize, fake_quantize, quantize
from .store import ExpertStore, StoreError, apply_bits, export_store, load_resident_model

__all__ = [
    "CACHE_POLICIES", "ExpertCache", "cache_budget", "GenerationConfig", "GenerationOutput", "generate", "BufferPool",
    "ExpertOffloader",
    "OffloadedSparseMoE", "OffloadStats", "load_offloaded", "offload", "resident_bytes", "BitwidthPlan",
    "PlanConfig", "exact_match_quality", "plan_bitwidths", "token_agreement_quality", "ExpertPredictor",
    "RoutingProfile", "profile_routing", "PROFILE_NAME", "QuantizedTensor", "dequantize", "fake_quantize", "quantize",
    "ExpertStore", "StoreError", "apply_bits", "export_store", "load_resident_model",
]
