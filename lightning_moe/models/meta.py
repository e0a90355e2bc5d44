"""Building a module whose every weight is loaded next, without initialising the weights randomly first.

A 135M-parameter LLM takes seconds to initialise on a CPU (minutes for a 7B one), only for the load
that follows to overwrite every value. Inside `parameters_on_meta()` modules get their parameters on
the meta device (shapes, no memory); `materialize(model)` then gives them uninitialised CPU memory,
which the caller must fill with a load that checks every key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["parameters_on_meta", "materialize"]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
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


def materialize(model: nn.Module) -> None:
    """Give every meta parameter and buffer (uninitialised) CPU memory; a tensor shared by modules stays shared.

    A buffer is on the meta device when it was built as a parameter and then turned into a buffer (an image
    tower's unused pooling keeps its weights as buffers, modalities/image.py); like the parameters, it is
    filled by the load next. Left on the meta device, `load_state_dict` would skip it with torch's
    "copying from a non-meta parameter ... is a no-op" warning. A non-persistent buffer on the meta device
    is a ValueError: no saved value could ever fill it."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                   requires_grad=param.requires_grad)
                module._parameters[name] = memo[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                if name in module._non_persistent_buffers_set:
                    raise ValueError(f"buffer {name!r} of {type(module).__name__} was built on the meta device and "
                                     "is not saved: no load can fill it")
                module._buffers[name] = memo.setdefault(id(buffer), torch.empty_like(buffer, device="cpu"))
