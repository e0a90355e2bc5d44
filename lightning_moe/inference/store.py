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
With `drop_page_cache=True` every read also tells the kernel to drop the file's pages from the OS
page cache, so the next read of that expert comes from storage again: what a device whose memory
cannot hold the store sees (and memory the cache budget does not count is not used behind its back).
The fingerprint (sha256 of the model config and of every non-expert weight) lets `check_model`
refuse a store that was exported from another model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn

from ..layers import SparseMoE
from ..models import MultimodalLM
from .quantize import FLOAT_BITS, QuantizedTensor, bits_label, dequantize, quantize

__all__ = ["ExpertStore", "safetensors_views", "ExpertTensors", "ExpertEntry", "StoreError", "export_store", "expert_layers", "apply_bits",
           "load_resident_model", "model_from_store",
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
    buffers: tuple[Tensor, ...] = ()  # the memory the tensors are views of (the offloader reuses it after eviction)

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


def _decode(tensors: dict[str, Tensor], bits: int, shapes: dict[str, tuple[int, int]], raw: Tensor) -> ExpertTensors:
    def matrix(name: str) -> Tensor | QuantizedTensor:
        if bits == FLOAT_BITS:
            return tensors[name]
        return QuantizedTensor(tensors[f"{name}.codes"], tensors[f"{name}.scale"], tensors[f"{name}.lo"], bits,
                               shapes[name])

    return ExpertTensors(matrix("w_in"), matrix("w_down"), tensors.get("b_in"), tensors.get("b_down"), bits, (raw,))


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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def safetensors_views(raw: Tensor, path: Path | str) -> dict[str, Tensor]:
    """The tensors of a safetensors file held in `raw` (uint8), as views of it (no copy when aligned).

    The format: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets}} (offsets relative to the end of the header), then the data. safetensors' own
    `load` copies every tensor out of the bytes; views let the offloader reuse the read buffer.
    `path` only names the file in errors.
    """
    try:
        if raw.numel() < 8:
            raise ValueError("shorter than the 8-byte header length")
        length = int.from_bytes(raw[:8].numpy().tobytes(), "little")
        if 8 + length > raw.numel():
            raise ValueError(f"header of {length} bytes runs past the end of the file")
        header = json.loads(raw[8 : 8 + length].numpy().tobytes())
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r}: unsupported dtype {info['dtype']!r}")
            start, end = (8 + length + offset for offset in info["data_offsets"])
            size = dtype.itemsize * math.prod(info["shape"])
            if end - start != size or end > raw.numel():
                raise ValueError(f"tensor {name!r}: data offsets {info['data_offsets']} do not fit its shape "
                                 f"{info['shape']} ({size} bytes) within the file")
            chunk = raw[start:end]
            if start % dtype.itemsize:
                chunk = chunk.clone()  # a view must start on an element boundary
            out[name] = chunk.view(dtype).view(info["shape"])
        return out
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise StoreError(f"expert file {path} cannot be decoded as safetensors: {err}") from err


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
    """A store directory opened for reading.

    verify: 'once' (sha256 on a file's first read), 'always', 'never'.
    drop_page_cache: after each expert read, advise the kernel to evict the file from the page
        cache (POSIX `posix_fadvise(DONTNEED)`), so every read is a read from storage.
    """

    directory: Path
    verify: str = "once"
    drop_page_cache: bool = False
    manifest: dict[str, Any] = field(init=False)
    entries: dict[tuple[int, int], ExpertEntry] = field(init=False)
    _verified: set[tuple[int, int]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.verify not in ("once", "always", "never"):
            raise ValueError(f"verify must be 'once', 'always' or 'never', got {self.verify!r}")
        if self.drop_page_cache and not hasattr(os, "posix_fadvise"):
            raise ValueError("drop_page_cache needs os.posix_fadvise (Linux and other POSIX systems), not available here")
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

    def expert_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Dense shapes of one expert of MoE layer `layer`: w_in (2I or I, H), w_down (H, I), biases if any."""
        info = self.layers[layer]
        hidden, inter = info["hidden_size"], info["intermediate_size"]
        rows_in = 2 * inter if info["gated"] else inter
        shapes = {"w_in": (rows_in, hidden), "w_down": (hidden, inter)}
        if info["bias"]:
            shapes.update({"b_in": (rows_in,), "b_down": (hidden,)})
        return shapes

    def dense_expert_bytes(self, layer: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of one expert of MoE layer `layer` held dense in `dtype`."""
        size = torch.tensor([], dtype=dtype).element_size()
        return size * sum(math.prod(shape) for shape in self.expert_shapes(layer).values())

    def bits(self) -> dict[tuple[int, int], int]:
        return {k: e.bits for k, e in self.entries.items()}

    # ------------------------------------------------------------------ reading
    def read_raw(self, layer: int, expert: int, out: Tensor | None = None) -> Tensor:
        """The expert's file as a uint8 tensor, checked against the manifest (existence, size, checksum).

        out: a uint8 buffer of at least the file's size to read into (the offloader reuses buffers);
        the result is then a view of it. Default: a new tensor.
        """
        entry = self.entries.get((layer, expert))
        if entry is None:
            raise StoreError(f"{self.directory / MANIFEST} has no expert {expert} in MoE layer {layer}")
        path = self.directory / entry.file
        if not path.is_file():
            raise StoreError(f"expert file {path} is missing (MoE layer {layer}, expert {expert})")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.bytes:
                raise StoreError(f"expert file {path} is truncated or altered: {size} bytes, the manifest says "
                                 f"{entry.bytes}")
            if out is not None and (out.dtype != torch.uint8 or out.numel() < size):
                raise ValueError(f"read buffer of {out.numel()} {out.dtype} elements for a {size}-byte expert file")
            raw = torch.empty(size, dtype=torch.uint8) if out is None else out[:size]
            read = f.readinto(raw.numpy())  # straight into the tensor's memory: no intermediate bytes object
            if self.drop_page_cache:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if read != size:
            raise StoreError(f"expert file {path} changed while reading: {read} of {size} bytes read")
        if self.verify == "always" or (self.verify == "once" and (layer, expert) not in self._verified):
            digest = hashlib.sha256(raw.numpy()).hexdigest()
            if digest != entry.sha256:
                raise StoreError(f"expert file {path} is corrupted: sha256 {digest[:12]}... does not match the "
                                 f"manifest's {entry.sha256[:12]}...")
            self._verified.add((layer, expert))
        return raw

    def evict_page_cache(self) -> None:
        """Advise the kernel to drop every expert file from the OS page cache (the next reads come from storage)."""
        if not hasattr(os, "posix_fadvise"):
            raise ValueError("evicting files from the page cache needs os.posix_fadvise (POSIX), not available here")
        for entry in self.entries.values():
            path = self.directory / entry.file
            if path.is_file():
                with open(path, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def read(self, layer: int, expert: int, out: Tensor | None = None) -> ExpertTensors:
        """One expert, its tensors views of the file's bytes (read into `out` when given, see `read_raw`)."""
        raw = self.read_raw(layer, expert, out)  # raises StoreError for an unknown expert
        entry = self.entries[(layer, expert)]
        tensors = safetensors_views(raw, self.directory / entry.file)
        return _decode(tensors, entry.bits, self.expert_shapes(layer), raw if out is None else out)

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


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (shapes, no memory); buffers
    (e.g. rotary frequencies, computed at construction and not saved) stay real. Parameters are
    allocated with `torch.empty` before the move, which touches no page, so nothing is resident."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialize_parameters(model: nn.Module) -> None:
    """Give every meta parameter (uninitialised) CPU memory; a parameter shared by modules stays shared."""
    memo: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                   requires_grad=param.requires_grad)
                module._parameters[name] = memo[id(param)]


def model_from_store(store: ExpertStore, replace_experts: Callable[[MultimodalLM], None] | None = None) -> MultimodalLM:
    """The recorded model with the store's resident weights (base.safetensors) loaded.

    The model is built with its parameters on the meta device and only then given memory, so no
    weight is initialised randomly just to be overwritten. replace_experts: None = every SparseMoE
    keeps its experts, read from the store (dequantised to float32): the whole model in memory, for
    profiling and planning. Otherwise `replace_experts(model)` swaps the SparseMoE layers for
    layers that hold no expert (offloading) before memory is given: the expert weights are never
    allocated, so loading peaks at the resident weights, not the whole model.
    """
    with _parameters_on_meta():  # no random initialisation of weights that are loaded next
        model = MultimodalLM.from_config_dict(store.manifest["model_config"])
    layers = expert_layers(model)
    if len(layers) != len(store.layers):
        raise StoreError(f"{store.directory}: the recorded model has {len(layers)} MoE layers, the manifest "
                         f"{len(store.layers)}")
    if replace_experts is not None:
        replace_experts(model)
    _materialize_parameters(model)
    missing, unexpected = model.load_state_dict(store.load_base(), strict=False)
    missing = set(missing) - (_expert_keys(model) if replace_experts is None else set())
    if missing or unexpected:
        raise StoreError(f"{store.directory / BASE_WEIGHTS} does not match the recorded model: "
                         f"missing {sorted(missing)[:5]}, unexpected {unexpected[:5]}")
    if replace_experts is None:
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


def load_resident_model(store: ExpertStore) -> MultimodalLM:
    """The whole model in memory from a store (experts dequantised to float32): for profiling and planning."""
    return model_from_store(store)


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
