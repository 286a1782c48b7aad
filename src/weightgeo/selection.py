"""Which tensors a pass analyses, decided in one place for the pair engine, the stream pass and the Tracker.

Every planner (:func:`weightgeo.engine.plan.plan_pair`, the stream plan of :class:`weightgeo.stream.StreamReader`,
:class:`weightgeo.track.Tracker`) asks :meth:`Selector.choose` about each tensor, from its canonical name, shape
and dtypes alone, and gets one :class:`Choice`: analyse it as a matrix, as an expert stack [E, out, in] (E
matrices, one per expert), elementwise only, or not at all, with the reason. So one tensor gets one reason
whichever pass looks at it, and nothing is dropped without one: tensors the include/exclude filter leaves out
are counted (``filtered_out``), every other tensor not analysed is listed with its reason.

>>> import torch
>>> sel = Selector(elementwise=False, svd=True)  # a stream or the Tracker: matrices only
>>> sel.choose("model.norm.weight", (16,), torch.float32).skipped
'1-D tensor: SVD metrics need a matrix'
>>> sel.choose("layers.0.mlp.experts.down_proj", (4, 16, 8), torch.bfloat16).experts
4
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import compile_filter
from .checkpoint.names import is_expert_stack

__all__ = ["Selector", "Choice", "tensor_uid", "ByUid", "FILTERED"]

Filter = str | Sequence[str] | None

#: the reason of a tensor the include/exclude filter leaves out (counted in ``meta["filtered_out"]``, not listed)
FILTERED = "left out by include/exclude"


def tensor_uid(key: str, expert: int | None) -> str:
    """The one name of an analysed matrix: the tensor's key, with ``[j]`` for expert j of a stack (the experts of a
    stack share its key).

    >>> tensor_uid("layers.0.mlp.experts.down_proj", 3), tensor_uid("layers.0.q_proj.weight", None)
    ('layers.0.mlp.experts.down_proj[3]', 'layers.0.q_proj.weight')
    """
    return key if expert is None else f"{key}[{expert}]"


class ByUid:
    """The ``uid`` of a planned matrix (a pair job, a stream matrix, a tracked matrix) from its ``key`` and
    ``expert``: mixed into each planner's record so that the property is written once."""

    key: str
    expert: int | None

    @property
    def uid(self) -> str:
        """Unique in its plan: the key, with ``[j]`` for expert j of a stack (:func:`tensor_uid`)."""
        return tensor_uid(self.key, self.expert)


@dataclass(frozen=True)
class Choice:
    """What a pass does with one tensor.

    Attributes:
        analyse: ``"matrix"`` (a 2-D weight), ``"experts"`` (an [E, out, in] stack: E matrices), ``"elementwise"``
            (update_sparsity only: not a matrix), or ``None`` (not analysed).
        experts: E, for ``"experts"``.
        skipped: the reason to list it under ``skipped`` (not analysed, or asked-for metrics it does not get).
        partial: the reason to list it under ``partial`` (analysed elementwise only while SVD metrics were asked).
        filtered: left out by the include/exclude filter (counted, not listed).
    """

    analyse: str | None
    experts: int = 0
    skipped: str | None = None
    partial: str | None = None
    filtered: bool = False


class Selector:
    """The one decision on which tensors a pass analyses.

    Args:
        include, exclude: the tensor filter (regexes or presets, :func:`~weightgeo.checkpoint.compile_filter`;
            bad patterns raise here).
        elementwise: update_sparsity is asked for: a tensor that is not a matrix is still analysed, elementwise.
        svd: some matrix metric is asked for (always, for streams and the Tracker): a tensor that gets none is
            said so, under ``partial`` (analysed elementwise) or ``skipped``.
        experts: an expert stack [E, out, in] is E matrices; ``False`` keeps it one tensor (elementwise only).
    """

    def __init__(
        self,
        include: Filter = None,
        exclude: Filter = None,
        *,
        elementwise: bool = False,
        svd: bool = True,
        experts: bool = True,
    ) -> None:
        self.keep: Callable[..., bool] = compile_filter(include, exclude)
        self.elementwise, self.svd, self.experts = elementwise, svd, experts

    def choose(
        self,
        name: str,
        shape: Sequence[int],
        dtype: torch.dtype,
        ft_dtype: torch.dtype | None = None,
        *,
        trainable: bool = True,
    ) -> Choice:
        """The choice for tensor ``name`` of ``shape`` stored as ``dtype`` (and ``ft_dtype`` on the other side of a
        pair, default the same); ``trainable=False``: a frozen parameter (its update is zero).

        Checked in this order: the filter, floating dtypes, emptiness, the shape (matrix, expert stack, other),
        then trainability.
        """
        shape = tuple(int(d) for d in shape)
        other = dtype if ft_dtype is None else ft_dtype
        if not self.keep(name, shape):
            return Choice(None, filtered=True)
        if not (dtype.is_floating_point and other.is_floating_point):
            return Choice(None, skipped=f"non-floating dtype ({dtype} / {other})")
        if any(d == 0 for d in shape):
            return Choice(None, skipped="empty tensor")
        stack = self.experts and is_expert_stack(name, shape)
        if len(shape) != 2 and not stack:
            why = f"{len(shape)}-D tensor: SVD metrics need a matrix"
            if len(shape) > 2:
                why += (
                    " (not an expert stack: an [E, out, in] stack is analysed per expert only under an 'experts' name)"
                )
            if not self.elementwise:
                return Choice(None, skipped=why)
            if not self.svd:
                return Choice("elementwise")
            # analysed for update_sparsity; a ≥3-D tensor is also listed as skipped: none of its SVD metrics exist
            also = why + "; its row has update_sparsity only" if len(shape) > 2 else None
            return Choice("elementwise", skipped=also, partial=why)
        if not trainable:
            return Choice(None, skipped="requires_grad=False (frozen: its update is zero)")
        if stack:
            return Choice("experts", experts=shape[0])
        return Choice("matrix")
