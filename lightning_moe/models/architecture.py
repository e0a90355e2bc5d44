"""Where an LLM family keeps things: its decoder layers, each layer's MLP, its MoE block, and the finders.

The only module that knows Hugging Face attribute paths (`DECODER_LAYER_PATHS`, `MLP_ATTRIBUTES`,
`MOE_FAMILIES`) and config field names (`sparse_export_config`); a new family with other names is
taught here once. The finders (`routed_layers`, `expert_layers`, `adapter_modules`) are the one way
the package lists a model's sparse layers and adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..layers import RoutedLayer, SparseMoE
from ..layers.adapters import kind_of

__all__ = ["DECODER_LAYER_PATHS", "MLP_ATTRIBUTES", "decoder_layers", "mlp_attribute", "resolve_layers",
           "routed_layers", "expert_layers", "adapter_modules", "MoEFamily", "MOE_FAMILIES", "moe_family",
           "native_moe_block", "hf_moe_keys", "sparse_export_config"]

# Attribute paths of the decoder-layer list, first match wins (Llama/Mistral/Qwen/Phi/Mixtral,
# GPT-2/GPT-J, OPT, GPT-NeoX).
DECODER_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")
# Attribute name of the feed-forward block inside a decoder layer.
MLP_ATTRIBUTES = ("mlp", "feed_forward", "block_sparse_moe")


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    for path in DECODER_LAYER_PATHS:
        layers = _get_path(llm, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(llm).__name__}; known paths: {DECODER_LAYER_PATHS}")


def mlp_attribute(layer: nn.Module) -> str:
    for name in MLP_ATTRIBUTES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    raise ValueError(f"cannot find the MLP of {type(layer).__name__}; known attributes: {MLP_ATTRIBUTES}")


def resolve_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """`"::2"` (a Python slice over layer indices; MoE-LLaVA's every other layer), `"all"`, or a list."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(p.strip().lstrip("-").isdigit() for p in parts if p.strip()):
            raise ValueError(f"layer spec {spec!r} is neither 'all', a slice like '::2', nor a list of indices")
        parts = [int(p) if p.strip() else None for p in parts]
        return list(range(num_layers))[slice(*parts)]
    bad = [i for i in spec if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for {num_layers} decoder layers")
    return sorted(i % num_layers for i in spec)


# ---------------------------------------------------------------------------- module finders
def routed_layers(model: nn.Module) -> list[tuple[str, RoutedLayer]]:
    """Every layer that routes tokens (SparseMoE, MoLE, ...), by name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedLayer)]


def expert_layers(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    """The SparseMoE layers, by name, in module order (index i is MoE layer i)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer of a registered adapter kind, by name, in module order."""
    return [(name, m) for name, m in model.named_modules() if kind_of(m) is not None]


# ---------------------------------------------------------------------------- native MoE families
@dataclass(frozen=True)
class MoEFamily:
    """Where a Hugging Face (transformers 5) MoE family keeps its sparse block's parts, and its config fields."""

    model_type: str
    num_experts: str = "num_experts"  # config field: experts per MoE layer
    norm_topk_prob: str | None = "norm_topk_prob"  # config field; None: always renormalise the top-k (Mixtral)
    block: str = "mlp"  # decoder-layer attribute holding the MoE block (or, on dense layers, a plain MLP)
    router: str = "gate"  # block.<router>.weight: (E, H)
    experts: str = "experts"  # block.<experts>.gate_up_proj (E, 2I, H) [gate rows first], .down_proj (E, H, I)
    shared_expert: str | None = None  # block.<shared_expert>: a gated MLP every token goes through
    shared_expert_gate: str | None = None  # block.<shared_expert_gate>.weight (1, H): sigmoid gate of its output
    top_k: str = "num_experts_per_tok"  # config field


MOE_FAMILIES: dict[str, MoEFamily] = {
    "mixtral": MoEFamily("mixtral", num_experts="num_local_experts", norm_topk_prob=None),
    "qwen2_moe": MoEFamily("qwen2_moe", shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    "qwen3_moe": MoEFamily("qwen3_moe"),
    "olmoe": MoEFamily("olmoe"),
}


def moe_family(llm: nn.Module) -> MoEFamily | None:
    """The native MoE family of a Hugging Face causal LM, or None for a dense (or unknown) one."""
    return MOE_FAMILIES.get(getattr(getattr(llm, "config", None), "model_type", None))


def native_moe_block(layer: nn.Module, family: MoEFamily) -> nn.Module | None:
    """The layer's Hugging Face MoE block, or None where the layer is dense (Qwen's `mlp_only_layers`)."""
    block = getattr(layer, family.block, None)
    experts = getattr(block, family.experts, None)
    return block if experts is not None and hasattr(experts, "gate_up_proj") else None


def hf_moe_keys(family: MoEFamily, moe_state_keys: list[str]) -> dict[str, str]:
    """SparseMoE state-dict keys (relative to the layer) -> the family's block keys (relative to the block)."""
    fixed = {"router.proj.weight": f"{family.router}.weight", "gate_up_proj": f"{family.experts}.gate_up_proj",
             "down_proj": f"{family.experts}.down_proj"}
    out = {}
    for key in moe_state_keys:
        if key in fixed:
            out[key] = fixed[key]
        elif key.startswith("shared_expert.") and family.shared_expert:
            out[key] = family.shared_expert + key[len("shared_expert"):]
        elif key == "shared_expert_gate.weight" and family.shared_expert_gate:
            out[key] = f"{family.shared_expert_gate}.weight"
        else:
            raise ValueError(f"the {family.model_type} block has no place for the SparseMoE tensor {key!r}")
    return out


def _moe_settings(moes: list[SparseMoE]) -> dict[str, Any]:
    """The one set of expert settings every sparse layer shares (HF configs hold one per model)."""
    settings = {(m.num_experts, m.top_k, m.intermediate_size, m.router.normalize,
                 None if m.shared_expert is None else m.shared_expert.up_proj.out_features,
                 m.shared_expert_gate is not None) for m in moes}
    if len(settings) != 1:
        raise ValueError(f"the sparse layers differ in (experts, top_k, expert size, normalize, shared expert): "
                         f"{sorted(settings, key=str)}; a Hugging Face MoE config holds one setting for all layers")
    E, k, inter, normalize, shared, shared_gate = settings.pop()
    return dict(num_experts=E, top_k=k, intermediate_size=inter, normalize=normalize, shared=shared,
                shared_gate=shared_gate)


def _check_exportable_moe(moes: list[SparseMoE]) -> None:
    for m in moes:
        problems = []
        if not m.gated or type(m.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
            problems.append("experts are not SwiGLU (gated, silu)")
        if m.b_in is not None or m.down_bias is not None:
            problems.append("experts have biases")
        if m.capacity_factor is not None or m.eval_capacity_factor is not None:
            problems.append("capacity_factor drops tokens (Hugging Face MoE blocks are dropless); set it to null")
        if m.router.proj.bias is not None:
            problems.append("the router has a bias")
        if problems:
            raise ValueError("no Hugging Face MoE family represents these sparse layers: " + "; ".join(problems))


def sparse_export_config(config: PretrainedConfig, sparse_layers: list[int], moes: list[SparseMoE],
                         native: list[int] | None) -> tuple[PretrainedConfig, MoEFamily]:
    """The Hugging Face config (and its family) that represents this LLM with SparseMoE at `sparse_layers`.

    native: the layers a native MoE family had (the `native_moe` log), or None: a native family exports with
    its own config, checked against the layers.
    Otherwise a dense family upcycled here: Llama becomes Mixtral when every layer is sparse with
    renormalised top-k weights and no shared expert, else Qwen2-MoE (its `mlp_only_layers` lists the dense
    layers, `qkv_bias` off, a zero-width shared expert unless there is a gated one). Anything no family
    represents exactly is a ValueError saying why and what setting would make it exportable.
    """
    if native is None and config.model_type != "llama":
        raise ValueError(
            f"no Hugging Face MoE family has {config.model_type}'s attention and MLP layout with experts; an "
            "upcycled model exports only from a Llama-family LLM (to Mixtral, or Qwen2-MoE for a subset of layers)")
    _check_exportable_moe(moes)
    s = _moe_settings(moes)
    n = config.num_hidden_layers
    if native is not None:
        family = MOE_FAMILIES[config.model_type]
        normalize = True if family.norm_topk_prob is None else bool(getattr(config, family.norm_topk_prob))
        ours = (s["num_experts"], s["top_k"], s["normalize"])
        theirs = (getattr(config, family.num_experts), getattr(config, family.top_k), normalize)
        if ours != theirs:
            raise ValueError(f"the sparse layers' (experts, top_k, normalize) {ours} no longer match the "
                             f"{config.model_type} config's {theirs}")
        if sorted(sparse_layers) != sorted(native):
            raise ValueError(f"sparse layers {sorted(sparse_layers)} differ from the {config.model_type} model's own "
                             f"{sorted(native)} (upcycled on top?); its config places experts only on those")
        return config, family
    if s["shared"] and not s["shared_gate"]:
        raise ValueError("a shared expert without a sigmoid gate has no Hugging Face family (Qwen2-MoE gates its "
                         "shared expert); exportable with shared_expert_gate=True")
    common = {k: v for k, v in config.to_dict().items()
              if k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                       "use_cache", "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id",
                       "bos_token_id", "eos_token_id", "dtype")}
    # Llama's attention_bias puts a bias on q, k, v AND o; Mixtral has none, Qwen2-MoE only on q, k, v
    if getattr(config, "attention_bias", False):
        raise ValueError("Llama with attention_bias=True (biases on q/k/v/o projections): Mixtral's attention has no "
                         "bias and Qwen2-MoE's none on o_proj; exportable with attention_bias=False")
    if getattr(config, "mlp_bias", False):
        raise ValueError("Llama with mlp_bias=True: no Hugging Face MoE family has MLP biases; exportable with "
                         "mlp_bias=False")
    if getattr(config, "pretraining_tp", 1) != 1:
        raise ValueError("Llama with pretraining_tp != 1 has no Hugging Face MoE counterpart; set pretraining_tp=1")
    if sorted(sparse_layers) == list(range(n)) and s["normalize"] and not s["shared"]:
        return AutoConfig.for_model("mixtral", **common, intermediate_size=s["intermediate_size"],
                                    num_local_experts=s["num_experts"], num_experts_per_tok=s["top_k"],
                                    sliding_window=None, router_jitter_noise=0.0), MOE_FAMILIES["mixtral"]
    # Qwen2-MoE: sparse where (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers; step 1 + the
    # dense layers listed picks any subset. Without a shared expert here, its shared expert is zero-width and
    # adds sigmoid(g x) * 0 = 0.
    dense = [i for i in range(n) if i not in sparse_layers]
    exported = AutoConfig.for_model(
        "qwen2_moe", **common, intermediate_size=config.intermediate_size, moe_intermediate_size=s["intermediate_size"],
        num_experts=s["num_experts"], num_experts_per_tok=s["top_k"], norm_topk_prob=s["normalize"],
        decoder_sparse_step=1, mlp_only_layers=dense, shared_expert_intermediate_size=s["shared"] or 0, qkv_bias=False,
        use_sliding_window=False, sliding_window=None)
    return exported, MOE_FAMILIES["qwen2_moe"]
