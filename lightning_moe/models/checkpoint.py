"""The surgery log: which in-place rewrites exist (`SURGERIES`), and their replay.

Every rewrite of a built `MultimodalLM` appends `{"op": name, **args}` to `model.surgery`;
`save_pretrained` writes the log and Lightning checkpoints hold it (in the model's config
record, with the state dict), and `replay_surgery` re-applies it on a
freshly built model, so a checkpoint holds only plain data: the log (JSON-able dicts), the tensors,
and the methods' config dataclasses (which `safe_load.checkpoint_safe` allows to unpickle).

A new rewrite is a plug-in: `register_surgery("my_op", fn)` where `fn(model, **logged_args)`
applies it (and appends its own entry). `adapter=True` marks ops that only add or grow adapters:
`save_adapters` saves them as the adapter part of a model, `merge_lora` drops them.

Records written by older code are read in the form the current code writes (`canonical_log`), in
one place: an op whose record changed form registers `canonical` with it, an op no longer written
is registered with `register_old_op` and the record it became. Replay and log comparisons both read
that form, so an old log rebuilds the same model and compares equal to the log of a new run.

This module imports nothing of models/, so `multimodal.py` can replay a log without a cycle; the
ops register when `lightning_moe.models` is imported (upcycle.py, adapters.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["SURGERIES", "register_surgery", "register_old_op", "replay_surgery", "adapter_ops", "canonical_log"]

# op name -> function(model, **logged args)
SURGERIES: dict[str, Callable[..., Any]] = {}
_ADAPTER_OPS: set[str] = set()
# op name -> function(logged args) -> the args as the current code logs them (an older record's form)
_CANONICAL: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
# op no longer written -> function(logged args) -> the record ({"op", **args}) the current code writes instead
_OLD_OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def register_surgery(op: str, apply: Callable[..., Any], *, adapter: bool = False, replace: bool = False,
                     canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """`apply(model, **args)` replays op; `canonical(args)`, where an op's record changed form, rewrites
    an old record as the op now writes it, so logs of old and new runs compare equal."""
    if op in SURGERIES and not replace and SURGERIES[op] is not apply:
        raise ValueError(f"surgery {op!r} is already registered; pass replace=True to override it")
    SURGERIES[op] = apply
    (_ADAPTER_OPS.add if adapter else _ADAPTER_OPS.discard)(op)
    if canonical is not None:
        _CANONICAL[op] = canonical


def register_old_op(op: str, upgrade: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """An op older code wrote and the current code does not: `upgrade(args)` returns the record
    (`{"op": <a registered op>, **args}`) that the current code writes for the same rewrite."""
    _OLD_OPS[op] = upgrade


def _canonical_record(entry: dict[str, Any]) -> dict[str, Any]:
    args = {k: v for k, v in entry.items() if k != "op"}
    if entry["op"] in _OLD_OPS:
        entry = _OLD_OPS[entry["op"]](args)
        args = {k: v for k, v in entry.items() if k != "op"}
    return {"op": entry["op"], **_CANONICAL[entry["op"]](args)} if entry["op"] in _CANONICAL else entry


def canonical_log(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`log` with every record in the form the current code writes (replaying either gives the same model)."""
    return [_canonical_record(e) for e in log]


def adapter_ops() -> frozenset[str]:
    return frozenset(_ADAPTER_OPS)


def replay_surgery(model: nn.Module, log: list[dict[str, Any]]) -> None:
    """Re-apply `log` on a freshly built model, each record read as the current code writes it."""
    for entry in canonical_log(log):
        if entry["op"] not in SURGERIES:
            raise ValueError(f"unknown surgery {entry['op']!r} in the model's log; known: {sorted(SURGERIES)}")
        SURGERIES[entry["op"]](model, **{k: v for k, v in entry.items() if k != "op"})
