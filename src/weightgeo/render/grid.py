"""The layer × module grid of one per-matrix metric: where in the network an update changed the weights.

Rows are transformer blocks (layer 0 at the top) plus one row for the tensors outside the blocks (embeddings,
head, final norm); columns are module types in the order a block runs them (attention, then MLP), biases after
their weights. A cell holding several tensors (the experts of an MoE layer) shows their mean, parameter-weighted
for ``update_sparsity`` as the model summary is; a cell with no measured value keeps the reason.

>>> rows = [{"name": "layers.0.q_proj.weight", "module": "q_proj", "layer": 0, "spectral_drift": 1e-3},
...         {"name": "layers.1.q_proj.weight", "module": "q_proj", "layer": 1, "spectral_drift": None},
...         {"name": "embed_tokens.weight", "module": "embed_tokens", "layer": None, "spectral_drift": 2e-3}]
>>> g = layer_module_grid(rows, "spectral_drift")
>>> g.layers, g.modules, g.values
([0, 1, None], ['q_proj', 'embed_tokens'], [[0.001, None], [None, None], [None, 0.002]])
>>> g.notes[1][0]
'layers.1.q_proj.weight: n/m (undefined (NaN): e.g. no visible update, or a zero singular value)'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .cells import NOT_MEASURED, fmt, number, reason

__all__ = ["Grid", "layer_module_grid", "column_of", "module_order"]

# the order a block runs its modules in (Llama/Qwen, GPT-2, GPT-NeoX, Falcon, MoE routers); others follow
_ORDER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "query_key_value",
    "c_attn",
    "o_proj",
    "dense",
    "out_proj",
    "c_proj",
    "gate",
    "router",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "dense_h_to_4h",
    "c_fc",
    "fc1",
    "w1",
    "w3",
    "down_proj",
    "dense_4h_to_h",
    "fc2",
    "w2",
    "input_layernorm",
    "post_attention_layernorm",
    "embed_tokens",
    "wte",
    "wpe",
    "embed_positions",
    "lm_head",
    "norm",
)
_WEIGHTED = frozenset({"update_sparsity"})


@dataclass(frozen=True)
class Grid:
    """``values[i][j]``: the metric of layer ``layers[i]`` (None = outside the blocks) and module ``modules[j]``
    (None = no tensor or not measured); ``notes[i][j]``: the cell's tensors with their values or reasons."""

    key: str
    layers: list[int | None]
    modules: list[str]
    values: list[list[float | None]]
    notes: list[list[str]]

    def measured_values(self) -> list[float]:
        return [v for row in self.values for v in row if v is not None]


def column_of(row: Mapping[str, Any]) -> str:
    """The grid column of a row: its module type, ``.bias`` added for a bias (a block's q_proj weight and
    bias are different tensors)."""
    module = str(row.get("module") or row.get("name", "?"))
    return module + ".bias" if str(row.get("name", "")).endswith(".bias") else module


def module_order(columns: Iterable[str]) -> list[str]:
    """Columns in block order (known modules first, biases after their weights, the rest alphabetical)."""

    def rank(c: str) -> tuple[int, int, str]:
        base, bias = (c[: -len(".bias")], 1) if c.endswith(".bias") else (c, 0)
        return (_ORDER.index(base) if base in _ORDER else len(_ORDER), bias, c)

    return sorted(set(columns), key=rank)


def layer_module_grid(
    rows: Sequence[Mapping[str, Any]],
    key: str,
    *,
    layers: Sequence[int | None] | None = None,
    modules: Sequence[str] | None = None,
    partial: Mapping[str, str] | None = None,
) -> Grid:
    """The grid of ``key`` over ``rows`` (one step's rows for a trajectory). ``layers`` / ``modules`` fix the
    axes (so that several runs share them); by default, those of the rows that carry ``key``."""
    cells: dict[tuple[int | None, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if key not in r and not (partial and str(r.get("name")) in partial):
            continue
        layer = r.get("layer")
        layer = int(layer) if isinstance(layer, (int, float)) and layer == layer else None
        cells.setdefault((layer, column_of(r)), []).append(r)
    if layers is None:
        found = {lay for lay, _ in cells}
        layers = sorted(x for x in found if x is not None) + ([None] if None in found else [])
    if modules is None:
        modules = module_order(c for _, c in cells)
    values: list[list[float | None]] = []
    notes: list[list[str]] = []
    for lay in layers:
        vrow: list[float | None] = []
        nrow: list[str] = []
        for mod in modules:
            v, note = _cell(cells.get((lay, mod), []), key, partial)
            vrow.append(v)
            nrow.append(note)
        values.append(vrow)
        notes.append(nrow)
    return Grid(key, list(layers), list(modules), values, notes)


def _cell(rs: list[Mapping[str, Any]], key: str, partial: Mapping[str, str] | None) -> tuple[float | None, str]:
    if not rs:
        return None, ""
    have = [(r, number(r.get(key))) for r in rs]
    vals = [(r, v) for r, v in have if v is not None]
    if not vals:
        why = reason(rs[0], key, partial)
        head = str(rs[0].get("name")) if len(rs) == 1 else f"{len(rs)} tensors"
        return None, f"{head}: {NOT_MEASURED} ({why})"
    if key in _WEIGHTED:
        w = [float(r.get("numel") or 1) for r, _ in vals]
        mean = sum(wi * v for wi, (_, v) in zip(w, vals)) / sum(w)
    else:
        mean = sum(v for _, v in vals) / len(vals)
    if len(rs) == 1:
        return mean, f"{rs[0].get('name')}: {fmt(mean)}"
    missing = len(rs) - len(vals)
    return mean, (
        f"mean of {len(vals)} tensors ({str(rs[0].get('name'))} …): {fmt(mean)}"
        + (f"; {missing} not measured" if missing else "")
    )
