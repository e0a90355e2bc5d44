"""The expert store: a trained sparse model split into resident weights and one file per expert.

Layout of a store directory (written by `export_store`):

    manifest.json                 what is where: model config, fingerprint, MoE layers, one entry
                                  per expert (layer, expert, file, bits, dtype, bytes, sha256), plan
    base.safetensors              every non-expert weight (embeddings, attention, norms, routers,
                                  vision tower, connector): what stays resident in memory
    experts/layer{L}_expert{E}.safetensors
                                  one expert: w_in (gate_up or up) and w_down, float32 or
                                  channel-wise quantised ("<name>.codes/.scale/.lo"), biases if any

L numbers the MoE layers in module order (0 = the first SparseMoE), not decoder layers.
Reading an expert checks that its file exists, has the manifest's byte size and (the first time
it is read, or always with verify="always") the manifest's sha256; any failure names the file.
The fingerprint (sha256 of the model config and of every non-expert weight) lets `check_model`
refuse a store that was exported from another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn

from ..layers import SparseMoE
from ..models import MultimodalLM
from .quantize import FLOAT_BITS, QuantizedTensor, bits_label, dequantize, quantize

__all__ = ["ExpertStore", "ExpertTensors", "ExpertEntry", "StoreError", "export_store", "expert_layers", "apply_bits",
           "load_resident_model",
           "model_fingerprint", "sparse_expert_tensors"]

MANIFEST = "manifest.json"
BASE_WEIGHTS = "base.safetensors"
STORE_FORMAT = "lightning-moe-expert-store"
STORE_VERSION = 1
# SparseMoE parameters that belong to experts (everything else, the router included, is resident)
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_bias", "up_bias", "down_bias")


class StoreError(ValueError):
    """A store that cannot be used: missing/corrupted/truncated file, wrong model, bad manifest."""


def expert_layers(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    """The SparseMoE layers of a model in module order: index i is MoE layer i of the store."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]


def _expert_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, _ in expert_layers(model):
        keys.update(f"{name}.{p}" for p in EXPERT_PARAMS)
    return keys


def resident_state(model: nn.Module) -> dict[str, Tensor]:
    """Every state-dict entry that is not an expert weight."""
    experts = _expert_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in experts}


def model_fingerprint(config: dict[str, Any], state: dict[str, Tensor]) -> str:
    """sha256 over the model config and every resident tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ExpertTensors:
    """One expert as read from the store: float tensors or QuantizedTensors, biases float."""

    w_in: Tensor | QuantizedTensor  # (2I or I, H)
    w_down: Tensor | QuantizedTensor  # (H, I)
    b_in: Tensor | None
    b_down: Tensor | None
    bits: int

    @property
    def nbytes(self) -> int:
        """Bytes this expert occupies in memory as stored (what the cache budget counts)."""
        total = 0
        for t in (self.w_in, self.w_down, self.b_in, self.b_down):
            if isinstance(t, QuantizedTensor):
                total += t.nbytes
            elif t is not None:
                total += t.numel() * t.element_size()
        return total

    def dense(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(w_in, w_down) as dense `dtype` matrices (dequantised if needed)."""
        return tuple(dequantize(t, dtype) if isinstance(t, QuantizedTensor) else t.to(dtype)
                     for t in (self.w_in, self.w_down))


def sparse_expert_tensors(moe: SparseMoE, expert: int) -> dict[str, Tensor]:
    """Expert `expert` of a resident SparseMoE as named float tensors."""
    out = {"w_in": moe.w_in[expert], "w_down": moe.down_proj[expert]}
    if moe.b_in is not None:
        out["b_in"], out["b_down"] = moe.b_in[expert], moe.down_bias[expert]
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _encode(tensors: dict[str, Tensor], bits: int) -> dict[str, Tensor]:
    if bits == FLOAT_BITS:
        return dict(tensors)
    out = {}
    for name, t in tensors.items():
        if name in ("w_in", "w_down"):
            q = quantize(t, bits)
            out.update({f"{name}.codes": q.codes, f"{name}.scale": q.scale, f"{name}.lo": q.lo})
        else:
            out[name] = t.float()
    return out


def _decode(tensors: dict[str, Tensor], bits: int, shapes: dict[str, tuple[int, int]]) -> ExpertTensors:
    def matrix(name: str) -> Tensor | QuantizedTensor:
        if bits == FLOAT_BITS:
            return tensors[name]
        return QuantizedTensor(tensors[f"{name}.codes"], tensors[f"{name}.scale"], tensors[f"{name}.lo"], bits,
                               shapes[name])

    return ExpertTensors(matrix("w_in"), matrix("w_down"), tensors.get("b_in"), tensors.get("b_down"), bits)


@dataclass
class ExpertEntry:
    """One expert's manifest line."""

    layer: int  # MoE layer index (module order)
    expert: int
    file: str  # relative to the store directory
    bits: int  # 32 = float32, else 8 / 4 / 2
    dtype: str  # 'float32', 'int8', 'int4', 'int2'
    bytes: int  # file size on disk
    memory_bytes: int  # tensor bytes once loaded (what the cache budget counts)
    sha256: str


def _expert_file(layer: int, expert: int) -> str:
    return f"experts/layer{layer}_expert{expert}.safetensors"


def _write_expert(directory: Path, layer: int, expert: int, tensors: dict[str, Tensor], bits: int) -> ExpertEntry:
    relative = _expert_file(layer, expert)
    encoded = _encode(tensors, bits)
    data = save(encoded, metadata={"layer": str(layer), "expert": str(expert), "bits": str(bits)})
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    memory = sum(t.numel() * t.element_size() for t in encoded.values())
    return ExpertEntry(layer, expert, relative, bits, bits_label(bits), len(data), memory, hashlib.sha256(data).hexdigest())


def export_store(
    model: MultimodalLM,
    directory: str | Path,
    bits: int | dict[tuple[int, int], int] = FLOAT_BITS,
    plan: dict[str, Any] | None = None,
) -> "ExpertStore":
    """Write `model` (resident, with SparseMoE layers) as an expert store.

    bits: one bitwidth for every expert, or {(layer, expert): bits} (a plan; missing = 32).
    plan: what the bitwidth planner measured, recorded in the manifest as is.
    """
    directory = Path(directory)
    layers = expert_layers(model)
    if not layers:
        raise StoreError("the model has no SparseMoE layer: nothing to offload (upcycle it first)")
    directory.mkdir(parents=True, exist_ok=True)
    state = resident_state(model)
    # safetensors refuses tensors sharing memory (tied embeddings): write each as its own copy
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in state.items()}, str(directory / BASE_WEIGHTS))
    config = model.config_dict()
    entries, layer_info = [], []
    for index, (name, moe) in enumerate(layers):
        layer_info.append({
            "index": index, "module": name, "num_experts": moe.num_experts, "top_k": moe.top_k,
            "hidden_size": moe.hidden_size, "intermediate_size": moe.intermediate_size,
            "gated": moe.gated, "bias": moe.b_in is not None,
        })
        for e in range(moe.num_experts):
            b = bits if isinstance(bits, int) else bits.get((index, e), FLOAT_BITS)
            entries.append(_write_expert(directory, index, e, sparse_expert_tensors(moe, e), b))
    manifest = {
        "format": STORE_FORMAT, "version": STORE_VERSION,
        "fingerprint": model_fingerprint(config, state),
        "model_config": config, "layers": layer_info,
        "experts": [vars(e) for e in entries], "plan": plan,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return ExpertStore(directory)


@dataclass
class ExpertStore:
    """A store directory opened for reading. verify: 'once' (sha256 on a file's first read), 'always', 'never'."""

    directory: Path
    verify: str = "once"
    manifest: dict[str, Any] = field(init=False)
    entries: dict[tuple[int, int], ExpertEntry] = field(init=False)
    _verified: set[tuple[int, int]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.verify not in ("once", "always", "never"):
            raise ValueError(f"verify must be 'once', 'always' or 'never', got {self.verify!r}")
        path = self.directory / MANIFEST
        if not path.is_file():
            raise StoreError(f"{path} not found: not an expert store (write one with export_store / `export`)")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{path} is not valid JSON: {err}") from err
        if self.manifest.get("format") != STORE_FORMAT or self.manifest.get("version") != STORE_VERSION:
            raise StoreError(f"{path}: format {self.manifest.get('format')!r} version {self.manifest.get('version')!r}, "
                             f"expected {STORE_FORMAT!r} version {STORE_VERSION}")
        self.entries = {(e["layer"], e["expert"]): ExpertEntry(**e) for e in self.manifest["experts"]}
        for layer in self.layers:
            missing = [e for e in range(layer["num_experts"]) if (layer["index"], e) not in self.entries]
            if missing:
                raise StoreError(f"{path}: MoE layer {layer['index']} has no manifest entry for experts {missing}")

    # ------------------------------------------------------------------ what the manifest says
    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.manifest["layers"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def largest_expert_bytes(self) -> int:
        return max(e.memory_bytes for e in self.entries.values())

    @property
    def expert_memory_bytes(self) -> int:
        return sum(e.memory_bytes for e in self.entries.values())

    def bits(self) -> dict[tuple[int, int], int]:
        return {k: e.bits for k, e in self.entries.items()}

    # ------------------------------------------------------------------ reading
    def read_bytes(self, layer: int, expert: int) -> bytes:
        """The expert's file, checked against the manifest (existence, size, checksum)."""
        entry = self.entries.get((layer, expert))
        if entry is None:
            raise StoreError(f"{self.directory / MANIFEST} has no expert {expert} in MoE layer {layer}")
        path = self.directory / entry.file
        if not path.is_file():
            raise StoreError(f"expert file {path} is missing (MoE layer {layer}, expert {expert})")
        data = path.read_bytes()
        if len(data) != entry.bytes:
            raise StoreError(f"expert file {path} is truncated or altered: {len(data)} bytes, the manifest says "
                             f"{entry.bytes}")
        if self.verify == "always" or (self.verify == "once" and (layer, expert) not in self._verified):
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry.sha256:
                raise StoreError(f"expert file {path} is corrupted: sha256 {digest[:12]}... does not match the "
                                 f"manifest's {entry.sha256[:12]}...")
            self._verified.add((layer, expert))
        return data

    def read(self, layer: int, expert: int) -> ExpertTensors:
        data = self.read_bytes(layer, expert)  # raises StoreError for an unknown expert
        entry = self.entries[(layer, expert)]
        info = self.layers[layer]
        rows_in = 2 * info["intermediate_size"] if info["gated"] else info["intermediate_size"]
        shapes = {"w_in": (rows_in, info["hidden_size"]), "w_down": (info["hidden_size"], info["intermediate_size"])}
        try:
            tensors = load_safetensors_bytes(data)
        except Exception as err:  # safetensors raises its own error types for malformed headers
            raise StoreError(f"expert file {self.directory / entry.file} cannot be decoded: {err}") from err
        return _decode(tensors, entry.bits, shapes)

    def load_base(self) -> dict[str, Tensor]:
        path = self.directory / BASE_WEIGHTS
        if not path.is_file():
            raise StoreError(f"resident weights {path} are missing")
        return load_file(str(path))

    # ------------------------------------------------------------------ matching a model
    def check_model(self, model: MultimodalLM) -> None:
        """Raise StoreError unless `model` is the model this store was exported from."""
        layers = expert_layers(model)
        shapes = [(m.num_experts, m.hidden_size, m.intermediate_size, m.gated) for _, m in layers]
        expected = [(l["num_experts"], l["hidden_size"], l["intermediate_size"], l["gated"]) for l in self.layers]
        if shapes != expected:
            raise StoreError(f"store {self.directory} was exported from another model: its MoE layers are "
                             f"(experts, hidden, intermediate, gated) {expected}, the model's are {shapes}")
        found = model_fingerprint(model.config_dict(), resident_state(model))
        if found != self.fingerprint:
            raise StoreError(f"store {self.directory} was exported from another model: the model's fingerprint "
                             f"{found[:12]}... differs from the manifest's {self.fingerprint[:12]}... "
                             "(config or non-expert weights differ)")

    def write_manifest(self) -> None:
        self.manifest["experts"] = [vars(e) for e in sorted(self.entries.values(), key=lambda e: (e.layer, e.expert))]
        (self.directory / MANIFEST).write_text(json.dumps(self.manifest, indent=1, default=str))

    def rewrite_expert(self, layer: int, expert: int, tensors: dict[str, Tensor], bits: int) -> None:
        """Replace one expert's file (e.g. at a planned bitwidth) and its manifest entry (call write_manifest)."""
        self.entries[(layer, expert)] = _write_expert(self.directory, layer, expert, tensors, bits)
        self._verified.discard((layer, expert))

    def read_float(self, layer: int, expert: int) -> dict[str, Tensor]:
        """The expert as named float32 tensors (dequantised if stored quantised)."""
        t = self.read(layer, expert)
        w_in, w_down = t.dense(torch.float32)
        out = {"w_in": w_in, "w_down": w_down}
        if t.b_in is not None:
            out["b_in"], out["b_down"] = t.b_in, t.b_down
        return out


def load_resident_model(store: ExpertStore) -> MultimodalLM:
    """The whole model in memory from a store (experts dequantised to float32): for profiling and planning."""
    model = MultimodalLM.from_config_dict(store.manifest["model_config"])
    layers = expert_layers(model)
    if len(layers) != len(store.layers):
        raise StoreError(f"{store.directory}: the recorded model has {len(layers)} MoE layers, the manifest "
                         f"{len(store.layers)}")
    missing, unexpected = model.load_state_dict(store.load_base(), strict=False)
    experts = _expert_keys(model)
    if set(missing) - experts or unexpected:
        raise StoreError(f"{store.directory / BASE_WEIGHTS} does not match the recorded model: "
                         f"missing {sorted(set(missing) - experts)[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for index, (_, moe) in enumerate(layers):
            for e in range(moe.num_experts):
                tensors = store.read_float(index, e)
                moe.w_in[e].copy_(tensors["w_in"])
                moe.down_proj[e].copy_(tensors["w_down"])
                if moe.b_in is not None:
                    moe.b_in[e].copy_(tensors["b_in"])
                    moe.down_bias[e].copy_(tensors["b_down"])
    return model.eval()


def apply_bits(store: ExpertStore, bits: dict[tuple[int, int], int], plan: dict[str, Any] | None = None) -> None:
    """Rewrite a float32 store's experts at the given bitwidths (missing = 32) and record the plan."""
    quantised = sorted(k for k, e in store.entries.items() if e.bits != FLOAT_BITS)
    if quantised:
        raise StoreError(f"{store.directory} already holds quantised experts (e.g. {quantised[:3]}); bitwidths are "
                         "applied to a float32 store (export again with bits 32)")
    for key in sorted(store.entries):
        b = bits.get(key, FLOAT_BITS)
        if b != FLOAT_BITS:
            store.rewrite_expert(*key, store.read_float(*key), b)
    store.manifest["plan"] = plan
    store.write_manifest()
