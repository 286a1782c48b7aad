"""In-memory tensors (a state_dict or an ``nn.Module``) behind the :class:`Checkpoint` interface.

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

__all__ = ["StateDictCheckpoint"]


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
