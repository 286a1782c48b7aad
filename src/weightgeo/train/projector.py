"""Subspace-constrained training (paper §4.2, App. F): project gradients onto a fixed input-side subspace.

For each named 2-D weight W [out, in] with an orthonormal basis V [in, K], a gradient hook replaces the
gradient by g V Vᵀ (its rows projected onto span V). Every other parameter is left alone.

Our choices, where the paper is silent (documented in docs/training.md):
- the projection acts on the gradient *before* the optimizer (AdamW then normalises elementwise, so the
  update itself is not exactly in span V; decoupled weight decay also acts on all of W);
- V is fixed for the rest of training (computed once, from ΔW at ~20% of training; never refreshed);
- which matrices: the caller's ``bases`` dict; ``subspace_bases`` defaults to **every** 2-D weight, the
  embeddings and lm_head included (so a projected run cannot keep its accuracy by training an unconstrained
  head); ``include=BLOCK_MATRICES`` restricts it to the transformer blocks (q/k/v/o, up/down);
- a ΔW of numerical rank r < K contributes only its r right singular vectors with σ > 0 (the others are
  arbitrary); a ΔW that is exactly zero (nothing passed the bf16 gate yet) gives V with 0 columns, i.e. that
  matrix's gradient is projected to zero.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from ..errors import WeightgeoError

__all__ = ["SubspaceProjector", "subspace_bases", "BLOCK_MATRICES"]

#: Default matrix set: the 2-D weights inside transformer blocks (attention + MLP).
BLOCK_MATRICES = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


class SubspaceProjector:
    """Register gradient hooks g ← g V Vᵀ on the named weights of ``model``; ``.remove()`` undoes them.

    >>> lin = torch.nn.Linear(4, 3, bias=False)
    >>> V = torch.eye(4)[:, :2]                       # keep input coordinates 0 and 1
    >>> proj = SubspaceProjector(lin, {"weight": V})
    >>> lin(torch.ones(1, 4)).sum().backward()
    >>> lin.weight.grad
    tensor([[1., 1., 0., 0.],
            [1., 1., 0., 0.],
            [1., 1., 0., 0.]])
    >>> proj.remove()
    """

    def __init__(self, model: nn.Module, bases: Mapping[str, torch.Tensor], *, check_orthonormal: bool = True):
        params = dict(model.named_parameters())
        self.handles: list = []
        self.bases: dict[str, torch.Tensor] = {}
        for name, V in bases.items():
            if name not in params:
                raise WeightgeoError(
                    f"SubspaceProjector: a basis for {name!r} but the model has no such parameter (names look like "
                    f"{next(iter(params))!r}); key bases by the names of model.named_parameters()"
                )
            p = params[name]
            if p.ndim != 2 or V.ndim != 2 or V.shape[0] != p.shape[1]:
                raise WeightgeoError(
                    f"SubspaceProjector: {name!r} is a weight of shape {tuple(p.shape)} and its basis V has shape "
                    f"{tuple(V.shape)}; pass V of shape [in={p.shape[-1]}, K] for a 2-D weight (subspace_bases "
                    f"builds them)"
                )
            V = V.detach().to(device=p.device, dtype=p.dtype).contiguous()  # the hook multiplies p's gradient
            if check_orthonormal and V.shape[1]:
                err = (V.T @ V - torch.eye(V.shape[1], dtype=V.dtype, device=V.device)).abs().max().item()
                if err > 1e-4:
                    raise WeightgeoError(
                        f"SubspaceProjector: the basis V of {name!r} is not orthonormal (max |VᵀV − I| = {err:.2e} > "
                        f"1e-4); orthonormalize it (torch.linalg.qr(V).Q) or pass check_orthonormal=False"
                    )
            P = V @ V.T  # [in, in]
            self.bases[name] = V
            self.handles.append(p.register_hook(lambda g, P=P: g @ P))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> SubspaceProjector:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def subspace_bases(
    current: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    initial: Mapping[str, torch.Tensor],
    *,
    k: int = 16,
    include: re.Pattern | None = None,
) -> dict[str, torch.Tensor]:
    """V_K = top-``k`` right singular vectors of ΔW = W_t − W_0 per matrix: {name: [in, k'] orthonormal}.

    ``current`` / ``initial``: state dicts (or ``named_parameters()``); computed in float64 with
    ``torch.linalg.svd`` (exact; fine for the miniature's ≤ 512-wide matrices). ``include``: names to use
    (default: every 2-D tensor). k' = min(k, numerical rank of ΔW): singular values at or below
    max(shape) · eps · σ_max (float64) carry no direction and are dropped, so k' = 0 when ΔW = 0.

    >>> W0 = {"w": torch.zeros(3, 4)}
    >>> Wt = {"w": torch.tensor([[0., 2., 0., 0.], [0., 0., 0., 0.], [0., 0., 0., 1.]])}
    >>> subspace_bases(Wt, W0, k=1, include=None)["w"].abs().squeeze()
    tensor([0., 1., 0., 0.])
    """
    cur = dict(current.items() if isinstance(current, Mapping) else current)
    out = {}
    for name, w in cur.items():
        if w.ndim != 2 or (include is not None and not include.search(name)):
            continue
        if name not in initial:
            raise WeightgeoError(
                f"subspace_bases: {name!r} is in current but not in initial ({len(initial)} tensors); pass the state "
                f"dicts of one model at two steps"
            )
        delta = w.detach().double() - initial[name].detach().double()
        _, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        tol = max(delta.shape) * torch.finfo(torch.float64).eps * (S[0].item() if len(S) else 0.0)
        rank = int((S > tol).sum().item()) if len(S) and S[0] > 0 else 0
        out[name] = Vh[: min(k, rank)].T.float().contiguous()
    if not out:
        raise WeightgeoError(
            f"subspace_bases: no 2-D tensor among {len(cur)} (e.g. {list(cur)[:3]}) matched "
            f"include={None if include is None else include.pattern!r}; pass an include regex that matches the "
            f"weight names, or include=None for every 2-D tensor"
        )
    return out
