"""In-memory tensors (a state_dict or an ``nn.Module``) behind the :class:`Checkpoint` interface.

Recognised by type: a ``Mapping`` of name -> tensor, or an ``nn.Module`` (its ``state_dict()``; transformers
``Conv1D`` weights are known to be stored [in, out] from the module classes, and ``module.config`` becomes
``Checkpoint.config``). Nothing is on disk, so there is nothing to judge complete.

>>> import torch
>>> ckpt = StateDictCheckpoint({"w": torch.zeros(2, 3, requires_grad=True)})
>>> ckpt.names(), ckpt.get("w").requires_grad
(['w'], False)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import WeightgeoError
from .base import Checkpoint, TensorInfo
from .format import Format, Source, nothing_to_check

__all__ = ["FORMAT", "StateDictCheckpoint"]


class StateDictCheckpoint(Checkpoint):
    """A mapping of name -> tensor; tensors are detached (shared with the source, not copied).

    ``get`` returns the detached tensor moved to CPU; treat it as read-only. ``in_out_names``: weights stored
    [in, out] (transformers ``Conv1D``), when known from the module classes.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        source: str = "state_dict",
        config: Mapping[str, Any] | None = None,
        in_out_names: Iterable[str] = (),
    ) -> None:
        super().__init__()
        bad = [
            (k, type(v).__name__)
            for k, v in tensors.items()
            if not isinstance(k, str) or not isinstance(v, torch.Tensor)
        ]
        if bad:
            raise WeightgeoError(
                f"{source}: entries {bad[:5]} are not (str name, Tensor) pairs; pass a "
                f"state_dict of tensors, e.g. model.state_dict()"
            )
        self._tensors = {k: v.detach() for k, v in tensors.items()}
        self.source = source
        self.config = dict(config or {})
        self.in_out_names = frozenset(in_out_names)

    def _infos(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def _get(self, name: str) -> torch.Tensor:
        return self._tensors[name].cpu()

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name][start:stop].cpu()


# --- the format ---------------------------------------------------------------------------------------------
def _recognise(source: Source) -> bool:
    return isinstance(source.value, (torch.nn.Module, Mapping))


def _open(source: Source) -> Checkpoint:
    value = source.value
    if isinstance(value, torch.nn.Module):
        # transformers' Conv1D (GPT-2 style) stores W as [in, out]; known from the class, whatever the config
        conv1d = [
            f"{name}.weight" if name else "weight"
            for name, mod in value.named_modules()
            if type(mod).__name__ == "Conv1D"
        ]
        return StateDictCheckpoint(
            value.state_dict(), source=type(value).__name__, config=_module_config(value), in_out_names=conv1d
        )
    return StateDictCheckpoint(value, source="state_dict")


def _module_config(module: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


FORMAT = Format(
    "state_dict",
    "in memory: a {name: Tensor} mapping or an nn.Module (its state_dict())",
    recognise=_recognise,
    open=_open,
    complete=nothing_to_check,
)
