"""Inference for trained sparse models: KV-cache generation and EdgeMoE expert offloading.

- `generation`: greedy / sampled generation for `MultimodalLM` with a KV cache, timed per phase.
- `quantize`: channel-wise int8 / int4 / int2 (packed) quantisation of expert weights.
- `store`: the store format: export a model into resident weights + one safetensors file per
  expert + a manifest; read and verify them (sizes, checksums, every damaged file named).
- `loading`: build a model from a store (meta-device loading), experts resident or offloaded.
- `offload`: the offloaded layer, `OffloadedSparseMoE`, and `offload` (swap it into a model).
- `offloader`: the `ExpertOffloader` (cache, prefetch thread, counters) serving those layers.
- `cache`: the byte-budgeted expert cache (LRU, frequency-plus-layer-distance eviction).
- `memory`: reused buffers (`BufferPool`), memory accounting (resident bytes, RSS), page-cache advice.
- `profiling`: routing profiles (expert counts, layer-to-layer transitions) of a calibration set.
- `predictors`: next-layer expert prediction behind one interface (transition table, lookahead).
- `plan`: expert-wise bitwidth planning against a quality tolerance.
Commands: `python -m lightning_moe.edge {export,profile,plan,generate,verify} --help` (the command
layer, `lightning_moe/edge.py`, outside this package because it reads datasets); in `main.py
predict`, the `lightning_moe.callbacks.ExpertOffloading` callback. docs/edgemoe_internals.md: how
the modules fit.

Imports models/, layers/ and the shared `tokens` module only (never Lightning, data/, metrics/ or
methods/), as docs/architecture.md lays out; tests/test_layering.py checks it.
"""

from .cache import CACHE_POLICIES, ExpertCache, cache_budget
from .generation import GenerationConfig, GenerationOutput, generate
from .loading import load_offloaded, load_resident_model, model_from_store
from .memory import BufferPool, memory_status, resident_bytes
from .offload import OffloadedSparseMoE, offload
from .offloader import ExpertOffloader, OffloadStats
from .plan import BitwidthPlan, PlanConfig, exact_match_quality, plan_bitwidths, token_agreement_quality
from .predictors import ExpertPredictor, LookaheadPredictor, Predictor, TransitionPredictor
from .profiling import PROFILE_NAME, RoutingProfile, profile_routing
from .quantize import QuantizedTensor, dequantize, fake_quantize, quantize
from .store import ExpertStore, StoreError, apply_bits, export_store

__all__ = [
    "CACHE_POLICIES", "ExpertCache", "cache_budget", "GenerationConfig", "GenerationOutput", "generate", "BufferPool",
    "ExpertOffloader",
    "OffloadedSparseMoE", "OffloadStats", "load_offloaded", "offload", "resident_bytes", "BitwidthPlan",
    "PlanConfig", "exact_match_quality", "plan_bitwidths", "token_agreement_quality", "ExpertPredictor",
    "RoutingProfile", "profile_routing", "PROFILE_NAME", "QuantizedTensor", "dequantize", "fake_quantize", "quantize",
    "ExpertStore", "StoreError", "apply_bits", "export_store", "load_resident_model", "model_from_store",
    "memory_status", "Predictor", "TransitionPredictor", "LookaheadPredictor",
]
