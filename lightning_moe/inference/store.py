"""The expert store format: a trained sparse model split into resident weights and one file per expert.

Layout of a store directory (written by `export_store`):

    manifest.json                 what is where: model config, fingerprint, MoE layers, the resident
                                  file (bytes, sha256), one entry per expert (layer, expert, file,
                                  bits, dtype, bytes, sha256), plan, and `checksums`: the sha256 of
                                  each of those sections as written
    base.safetensors              every non-expert weight (embeddings, attention, norms, routers,
                                  vision tower, connector): what stays resident in memory
    experts/layer{L}_expert{E}.safetensors
                                  one expert: w_in (gate_up or up) and w_down, float32 or
                                  channel-wise quantised ("<name>.codes/.scale/.lo"), biases if any

L numbers the MoE layers in module order (0 = the first SparseMoE), not decoder layers.
Checks, each failure a `StoreError` that names the file and lists every damaged file of the store:
- opening a store: the manifest's sections match their checksums (a hand-edited model config would
  build another model from the same weights), every path it names stays inside the store directory
  (symlinks resolved; such a file is never read), and every file exists with the manifest's byte size;
- reading an expert: its size again and (the first time it is read, or always with
  verify="always") the manifest's sha256;
- `load_base` (what building a model from the store reads): base.safetensors' size and sha256
  before any of its weights is used (a store written before the manifest recorded them: the
  manifest's fingerprint, which covers the same tensors); a store written before the manifest
  recorded its checksums: the fingerprint over the model config and the resident tensors, which
  catches an edited config;
- `damaged_files()` / `verify_files()` (the `verify` command): everything, checksums included.
With `drop_page_cache=True` every read also tells the kernel to drop the file's pages from the OS
page cache, so the next read of that expert comes from storage again: what a device whose memory
cannot hold the store sees (and memory the cache budget does not count is not used behind its back).
The fingerprint (sha256 of the model config and of every non-expert weight) lets `check_model`
refuse a store that was exported from another model. Building a model from a store: loading.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save, save_file
from torch import Tensor, nn

from ..layers import SparseMoE
from ..models import MultimodalLM, canonical_log, expert_layers
from .memory import drop_from_page_cache, evict_from_page_cache, require_page_cache_advice, tensor_bytes
from .quantize import FLOAT_BITS, QuantizedTensor, bits_label, dequantize, quantize

__all__ = ["ExpertStore", "safetensors_views", "ExpertTensors", "ExpertEntry", "StoreError", "export_store",
           "expert_layers", "expert_keys", "resident_state", "apply_bits", "model_fingerprint", "sparse_expert_tensors",
           "Verify"]

MANIFEST = "manifest.json"
CHECKSUMS = "checksums"  # the manifest key holding {section: sha256} of every other key
BASE_WEIGHTS = "base.safetensors"
STORE_FORMAT = "lightning-moe-expert-store"
STORE_VERSION = 1
Verify = Literal["once", "always", "never"]
VERIFY_MODES = ("once", "always", "never")
# SparseMoE parameters that belong to experts (everything else, the router included, is resident)
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_bias", "up_bias", "down_bias")


class StoreError(ValueError):
    """A store that cannot be used: missing/corrupted/truncated file, wrong model, bad manifest. `damaged`: every
    damaged file of the store found with it, {path relative to the store `directory`: what is wrong}."""

    def __init__(self, message: str, directory: Path | None = None, damaged: dict[str, str] | None = None):
        super().__init__(message)
        self.directory, self.damaged = directory, dict(damaged or {})

    def one_line(self, shown: int = 3) -> str:
        """The message on one line: its first line and, for a damaged store, how many files are damaged and the
        first `shown` of them by name and problem (what a command prints; `verify` lists every one)."""
        first = str(self).splitlines()[0].rstrip(" :")
        if not self.damaged:
            return first
        names = [f"{name} ({why.split(':')[0]})" for name, why in list(self.damaged.items())[:shown]]
        more = f" and {len(self.damaged) - shown} more" if len(self.damaged) > shown else ""
        count = f"{len(self.damaged)} damaged file{'s' if len(self.damaged) > 1 else ''}"
        summary = (f"store {self.directory} has {count}: {', '.join(names)}{more} (`python -m lightning_moe.edge "
                   f"verify --store {self.directory}` lists each; export the store again)")
        return summary if first.startswith(f"store {self.directory} has") else f"{first}; {summary}"


def expert_keys(model: nn.Module) -> set[str]:
    """State-dict names of every expert weight of the model's SparseMoE layers (what the store keeps apart)."""
    keys = set()
    for name, _ in expert_layers(model):
        keys.update(f"{name}.{p}" for p in EXPERT_PARAMS)
    return keys


def resident_state(model: nn.Module) -> dict[str, Tensor]:
    """Every state-dict entry that is not an expert weight."""
    experts = expert_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in experts}


def _as_json(config: dict[str, Any]) -> Any:
    """`config` as the manifest holds it (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _section_sha256(value: Any) -> str:
    """sha256 of one manifest section in the form the manifest holds it (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(_as_json(value), sort_keys=True).encode()).hexdigest()


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json with the checksum of each of its sections."""
    manifest = {k: v for k, v in manifest.items() if k != CHECKSUMS}
    manifest[CHECKSUMS] = {key: _section_sha256(value) for key, value in manifest.items()}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))


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
        return sum(tensor_bytes(t) for t in (self.w_in, self.w_down, self.b_in, self.b_down))

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
        raise StoreError(f"{path} cannot be decoded as safetensors: {err}") from err


def _file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks (a store's files may be larger than the memory to spare)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_file(path: Path) -> Tensor:
    """A whole file as a uint8 tensor (read straight into the tensor's memory); StoreError if it changes meanwhile."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = torch.empty(size, dtype=torch.uint8)
        read = f.readinto(raw.numpy())
    if read != size:
        raise StoreError(f"{path} changed while reading: {read} of {size} bytes read")
    return raw


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
    base_path = directory / BASE_WEIGHTS
    base = {"file": BASE_WEIGHTS, "bytes": base_path.stat().st_size, "sha256": _file_sha256(base_path)}
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
        "model_config": config, "layers": layer_info, "base": base,
        "experts": [vars(e) for e in entries], "plan": plan,
    }
    _write_manifest(directory, manifest)
    return ExpertStore(directory)


@dataclass
class ExpertStore:
    """A store directory opened for reading.

    Opening checks that every file the manifest names exists with its recorded size (a StoreError
    lists every one that does not). verify: when an expert's sha256 is checked: 'once' (on its
    first read), 'always', 'never' (base.safetensors: at every `load_base`, unless 'never').
    drop_page_cache: after each expert read, advise the kernel to evict the file from the page
        cache (POSIX `posix_fadvise(DONTNEED)`), so every read is a read from storage.
    """

    directory: Path
    verify: Verify = "once"
    drop_page_cache: bool = False
    manifest: dict[str, Any] = field(init=False)
    entries: dict[tuple[int, int], ExpertEntry] = field(init=False)
    _verified: set[tuple[int, int]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if self.drop_page_cache:
            require_page_cache_advice("drop_page_cache")
        path = self.directory / MANIFEST
        if not path.is_file():
            raise StoreError(f"{path} not found: not an expert store (write one with export_store / `export`)")
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(self.manifest, dict):
            raise StoreError(f"{path} holds a JSON {type(self.manifest).__name__}, not a store manifest (an object)")
        if self.manifest.get("format") != STORE_FORMAT or self.manifest.get("version") != STORE_VERSION:
            raise StoreError(f"{path}: format {self.manifest.get('format')!r} version {self.manifest.get('version')!r}, "
                             f"expected {STORE_FORMAT!r} version {STORE_VERSION}")
        try:
            self.entries = {(e["layer"], e["expert"]): ExpertEntry(**e) for e in self.manifest["experts"]}
            missing = {layer["index"]: [e for e in range(layer["num_experts"]) if (layer["index"], e) not in self.entries]
                       for layer in self.layers}
        except (KeyError, TypeError) as err:
            problem = self._manifest_problem()
            raise StoreError(f"{path} is {problem}" if problem else f"{path}: malformed entry ({err!r})") from err
        for layer, experts in missing.items():
            if experts:
                raise StoreError(f"{path}: MoE layer {layer} has no manifest entry for experts {experts}")
        if self.damaged_files(checksums=False):  # a stat per file: a missing or cut file fails now...
            raise self._damage_error(self.damaged_files())  # ...listed with every other damaged one

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

    # ------------------------------------------------------------------ checking files
    def _manifest_problem(self) -> str | None:
        """What is wrong with the manifest's sections against its recorded checksums, if anything (a store
        written before the manifest recorded them: None, its config is checked through the fingerprint)."""
        recorded = self.manifest.get(CHECKSUMS)
        if recorded is None:
            return None
        if not isinstance(recorded, dict):
            return f"altered: its {CHECKSUMS!r} is not a mapping of sections to sha256"
        sections = {k: v for k, v in self.manifest.items() if k != CHECKSUMS}
        altered = sorted(k for k in sections.keys() | recorded.keys()
                         if k not in sections or recorded.get(k) != _section_sha256(sections[k]))
        if altered:
            return (f"altered since export: {', '.join(altered)} "
                    f"{'does' if len(altered) == 1 else 'do'} not match the checksum{'s' if len(altered) > 1 else ''} "
                    "recorded with it")
        return None

    def _escape(self, relative: str) -> str | None:
        """Why the file a manifest entry names is refused (absolute, or outside the store once symlinks are
        resolved), None if it lies inside the store directory."""
        if Path(relative).is_absolute():
            return "an absolute path"
        resolved = (self.directory / relative).resolve()
        if not resolved.is_relative_to(self.directory.resolve()):
            return f"outside the store directory (it resolves to {resolved})"
        return None

    def _path(self, relative: str, what: str) -> Path:
        """The file of a manifest entry inside the store; StoreError (naming the entry) for one outside it."""
        escape = self._escape(relative)
        if escape is not None:
            raise self._damaged(f"{self.directory / MANIFEST}: {what} names {relative}, {escape}: refused")
        return self.directory / relative

    def damaged_files(self, checksums: bool = True) -> dict[str, str]:
        """Every damaged file of the store: {path relative to the store: what is wrong}, empty if none.

        Checks that the manifest matches its recorded checksums, that each file it names lies inside
        the store directory (such a file is never opened), exists and has its recorded size and, with
        `checksums`, its recorded sha256 (base.safetensors of a store written before the manifest
        recorded it: the manifest's fingerprint of the resident tensors; a store written before the
        manifest recorded its own checksums: the fingerprint, which covers the model config too).
        """
        damaged = {}
        problem = self._manifest_problem()
        if problem:
            damaged[MANIFEST] = problem
        base = self.manifest.get("base")
        files = [(BASE_WEIGHTS, base["bytes"] if base else None, base["sha256"] if base else None, "the resident file")]
        files += [(e.file, e.bytes, e.sha256, f"the entry of MoE layer {e.layer}, expert {e.expert}")
                  for _, e in sorted(self.entries.items())]
        for relative, size, digest, what in files:
            path = self.directory / relative
            if (escape := self._escape(relative)) is not None:
                damaged[relative] = f"refused: {what} in the manifest names it, {escape}"
            elif not path.is_file():
                damaged[relative] = "missing"
            elif size is not None and path.stat().st_size != size:
                damaged[relative] = f"truncated or altered: {path.stat().st_size} bytes, the manifest says {size}"
            elif checksums and digest is not None and (found := _file_sha256(path)) != digest:
                damaged[relative] = f"corrupted: sha256 {found[:12]}... does not match the manifest's {digest[:12]}..."
        if checksums and CHECKSUMS not in self.manifest and BASE_WEIGHTS not in damaged:
            path = self.directory / BASE_WEIGHTS
            try:
                problem = self._fingerprint_problem(safetensors_views(_read_file(path), path))
            except StoreError as err:
                problem = f"corrupted: {err}"
            if problem:  # with the file's checksum intact, what differs is the manifest's config
                damaged[MANIFEST if base else BASE_WEIGHTS] = problem
        return damaged

    def verify_files(self) -> int:
        """Check every file, checksums included; raise StoreError listing every damaged one, else return
        how many files were checked."""
        damaged = self.damaged_files()
        if damaged:
            raise self._damage_error(damaged)
        return 1 + len(self.entries)

    def _damage_report(self, damaged: dict[str, str]) -> str:
        lines = "\n".join(f"  {self.directory / relative} is {why}" for relative, why in damaged.items())
        return (f"store {self.directory} has {len(damaged)} damaged file{'s' if len(damaged) > 1 else ''} "
                f"(export the store again):\n{lines}")

    def _damage_error(self, damaged: dict[str, str], message: str | None = None) -> StoreError:
        """The error listing every damaged file of the store (`damaged_files()`), after `message` if given."""
        report = self._damage_report(damaged)
        return StoreError(f"{message}\n{report}" if message else report, self.directory, damaged)

    def _damaged(self, message: str) -> StoreError:
        """The error for damage just found (`message` names the file), listing every damaged file of the store:
        one bad file is rarely alone, and a user fixing them one run at a time would not know."""
        damaged = self.damaged_files()
        return self._damage_error(damaged, message) if damaged else StoreError(message, self.directory)

    def _fingerprint_problem(self, tensors: dict[str, Tensor]) -> str | None:
        """For a store whose manifest has no checksum of base.safetensors: what is wrong with its tensors, if
        anything, judged by the manifest's fingerprint (sha256 over the config and every resident tensor)."""
        found = model_fingerprint(self.manifest["model_config"], tensors)
        if found == self.fingerprint:
            return None
        if self.manifest.get("base"):  # the file matches its sha256: the config is what changed
            return (f"altered since export: its model_config and the resident tensors give the fingerprint "
                    f"{found[:12]}..., the manifest records {self.fingerprint[:12]}...")
        return (f"corrupted: the fingerprint of its tensors {found[:12]}... does not match the manifest's "
                f"{self.fingerprint[:12]}...")

    # ------------------------------------------------------------------ reading
    def read_raw(self, layer: int, expert: int, out: Tensor | None = None) -> Tensor:
        """The expert's file as a uint8 tensor, checked against the manifest (existence, size, checksum).

        out: a uint8 buffer of at least the file's size to read into (the offloader reuses buffers);
        the result is then a view of it. Default: a new tensor.
        """
        entry = self.entries.get((layer, expert))
        if entry is None:
            raise StoreError(f"{self.directory / MANIFEST} has no expert {expert} in MoE layer {layer}")
        path = self._path(entry.file, f"the entry of MoE layer {layer}, expert {expert}")
        if not path.is_file():
            raise self._damaged(f"expert file {path} is missing (MoE layer {layer}, expert {expert})")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.bytes:
                raise self._damaged(f"expert file {path} is truncated or altered: {size} bytes, the manifest says "
                                    f"{entry.bytes}")
            if out is not None and (out.dtype != torch.uint8 or out.numel() < size):
                raise ValueError(f"read buffer of {out.numel()} {out.dtype} elements for a {size}-byte expert file")
            raw = torch.empty(size, dtype=torch.uint8) if out is None else out[:size]
            read = f.readinto(raw.numpy())  # straight into the tensor's memory: no intermediate bytes object
            if self.drop_page_cache:
                drop_from_page_cache(f.fileno())
        if read != size:
            raise self._damaged(f"expert file {path} changed while reading: {read} of {size} bytes read")
        if self.verify == "always" or (self.verify == "once" and (layer, expert) not in self._verified):
            digest = hashlib.sha256(raw.numpy()).hexdigest()
            if digest != entry.sha256:
                raise self._damaged(f"expert file {path} is corrupted: sha256 {digest[:12]}... does not match the "
                                    f"manifest's {entry.sha256[:12]}...")
            self._verified.add((layer, expert))
        return raw

    def evict_page_cache(self) -> None:
        """Advise the kernel to drop every expert file from the OS page cache (the next reads come from storage)."""
        evict_from_page_cache(self.directory / e.file for e in self.entries.values() if self._escape(e.file) is None)

    def read(self, layer: int, expert: int, out: Tensor | None = None) -> ExpertTensors:
        """One expert, its tensors views of the file's bytes (read into `out` when given, see `read_raw`)."""
        raw = self.read_raw(layer, expert, out)  # raises StoreError for an unknown expert
        entry = self.entries[(layer, expert)]
        tensors = safetensors_views(raw, self.directory / entry.file)
        return _decode(tensors, entry.bits, self.expert_shapes(layer), raw if out is None else out)

    def load_base(self) -> dict[str, Tensor]:
        """The resident weights (base.safetensors), verified against the manifest before any is used.

        Its byte size and (unless verify='never') its sha256; a store written before the manifest
        recorded them: the manifest's fingerprint of the resident tensors. The tensors are views of
        one buffer read from the file (loading them into a model copies them once, as safetensors'
        own loader would).
        """
        path = self._path(BASE_WEIGHTS, "the resident file")
        entry = self.manifest.get("base")
        if not path.is_file():
            raise self._damaged(f"resident weights {path} are missing")
        size = path.stat().st_size
        if entry is not None and size != entry["bytes"]:
            raise self._damaged(f"resident weights {path} are truncated or altered: {size} bytes, the manifest says "
                                f"{entry['bytes']}")
        raw = _read_file(path)
        if entry is not None and self.verify != "never":
            digest = hashlib.sha256(raw.numpy()).hexdigest()
            if digest != entry["sha256"]:
                raise self._damaged(f"resident weights {path} are corrupted: sha256 {digest[:12]}... does not match "
                                    f"the manifest's {entry['sha256'][:12]}...")
        try:
            tensors = safetensors_views(raw, path)
        except StoreError as err:
            raise self._damaged(str(err)) from err
        if CHECKSUMS not in self.manifest and self.verify != "never":
            problem = self._fingerprint_problem(tensors)
            if problem and entry is not None:
                raise self._damaged(f"{self.directory / MANIFEST} is {problem}")
            if problem:
                raise self._damaged(f"resident weights {path} are {problem}")
        return tensors

    # ------------------------------------------------------------------ matching a model
    def check_model(self, model: MultimodalLM) -> None:
        """Raise StoreError unless `model` is the model this store was exported from."""
        layers = expert_layers(model)
        shapes = [(m.num_experts, m.hidden_size, m.intermediate_size, m.gated) for _, m in layers]
        expected = [(l["num_experts"], l["hidden_size"], l["intermediate_size"], l["gated"]) for l in self.layers]
        if shapes != expected:
            raise StoreError(f"store {self.directory} was exported from another model: its MoE layers are "
                             f"(experts, hidden, intermediate, gated) {expected}, the model's are {shapes}")
        config = model.config_dict()
        recorded = self.manifest["model_config"]
        if _as_json({**recorded, "surgery": canonical_log(recorded["surgery"])}) == _as_json(config):
            # the same model, whose surgery the store recorded as older code wrote it: its fingerprint covers that form
            config = recorded
        found = model_fingerprint(config, resident_state(model))
        if found != self.fingerprint:
            raise StoreError(f"store {self.directory} was exported from another model: the model's fingerprint "
                             f"{found[:12]}... differs from the manifest's {self.fingerprint[:12]}... "
                             "(config or non-expert weights differ)")

    def write_manifest(self) -> None:
        self.manifest["experts"] = [vars(e) for e in sorted(self.entries.values(), key=lambda e: (e.layer, e.expert))]
        _write_manifest(self.directory, self.manifest)
        self.manifest = json.loads((self.directory / MANIFEST).read_text())

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
