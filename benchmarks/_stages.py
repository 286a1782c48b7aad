"""Per-stage timing of a ``weightgeo.compare`` pass, for the profile benchmark (benchmarks/bench_profile.py).

The library's step functions are wrapped where the pass looks them up (module attributes), for the duration of a
``with Stages() as st:`` block, and each wrapper adds its *exclusive* time (its own time minus that of the wrapped
steps it calls) to its stage, keyed by the shape group being computed. Nothing in the library changes: the
wrappers call the originals and are removed on exit. Reads run in the read-ahead thread, so their time is kept
apart ("read (background thread)") from the main thread's wait for them ("read: wait in the main thread"), which
is what reading adds to the wall clock.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

#: (module, attribute, stage) — the attribute is replaced in that module only, where the pass looks it up.
WRAPPED = [
    ("weightgeo.engine.run", "read_stack", "read (background thread)"),
    ("weightgeo.engine.run", "read_chunk", "read (background thread)"),
    ("weightgeo.engine.run", "read_fp8", "read (background thread)"),
    ("weightgeo.engine.run", "chunk_unchanged", "bf16 rule + finiteness"),
    ("weightgeo.engine.groups", "finite_chunks", "bf16 rule + finiteness"),
    ("weightgeo.engine.groups", "fp8_unchanged", "bf16 rule + finiteness"),
    ("weightgeo.engine.groups", "base_spectrum", "base decomposition"),
    ("weightgeo.metrics.pair", "base_spectrum", "base decomposition"),  # a group's base in halves, one per lane
    ("weightgeo.linalg.pairwise", "_base_spectrum", "base decomposition"),  # (linalg.hardware.over_lanes)
    ("weightgeo.engine.groups", "batched_pair_metrics", "pair kernel: other"),
    ("weightgeo.engine.run", "matrix_rows", "row assembly"),
    ("weightgeo.linalg.svd", "gram", "› float64 Gram"),
    ("weightgeo.metrics.pair", "side_products", "fine-tune products"),
    ("weightgeo.metrics.pair", "products", "fine-tune products"),
    ("weightgeo.metrics.pair", "pair_eigen", "pair eigenproblem: F = VᵀDV"),
    ("weightgeo.linalg.pairwise", "top_eigh", "› top-k eigh"),  # its full eigh (k > 0.4·n) nests inside
    ("weightgeo.linalg.svd", "eigh", "› eigh"),  # W0's Gram: linalg.eigen.eigh (torch's or SciPy's LAPACK)
    # linalg.eigen.eigvalsh (torch's or SciPy's LAPACK: the policy's eigvalsh_lapack), called by svd.symmetric_eigenvalues
    ("weightgeo.linalg.svd", "eigvalsh", "› eigvalsh"),
    ("weightgeo.metrics.pair", "pair_spectrum", "NSS (+ fallback)"),
    ("weightgeo.metrics.pair", "_rotation_rows", "angles"),
    ("weightgeo.metrics.pair", "_stable_ranks", "stable rank"),
    ("weightgeo.metrics.pair", "_localization_rows", "localization"),
    ("weightgeo.metrics.pair", "localize", "localization"),
]
#: LAPACK calls (and, above, the Gram), attributed to the stage that calls them ("<stage> › eigh").
LAPACK = [("eigh", "eigh"), ("eigvalsh", "eigvalsh"), ("svdvals", "svdvals")]

ORDER = [
    "read (background thread)",
    "read: wait in the main thread",
    "bf16 rule + finiteness",
    "base decomposition",
    "base decomposition › float64 Gram",
    "base decomposition › eigh",
    "fine-tune products",
    "pair eigenproblem: F = VᵀDV",
    "pair eigenproblem: F = VᵀDV › top-k eigh",
    "pair eigenproblem: F = VᵀDV › eigh",
    "pair eigenproblem: F = VᵀDV › eigvalsh",
    "NSS (+ fallback)",
    "NSS (+ fallback) › float64 Gram",
    "NSS (+ fallback) › eigvalsh",
    "angles",
    "angles › eigvalsh",
    "angles › svdvals",
    "stable rank",
    "stable rank › eigvalsh",
    "localization",
    "pair kernel: other",
    "row assembly",
]


class Stages:
    """Exclusive seconds per (stage, shape group) while active; ``table()`` renders them."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self._local = threading.local()
        self._undo: list[tuple[object, str, object]] = []
        self.shapes: list[str] = []
        self.shape = "elementwise stream"  # the group being computed (shared by both lanes)

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def _shape(self) -> str:
        return self.shape

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        stack = self._stack()
        if name.startswith("›"):  # a LAPACK call or the Gram: named after its caller
            name = (stack[-1][0].split(" › ")[0] if stack else "other") + " " + name
        if threading.current_thread().name.startswith("weightgeo-lane") and not name.startswith("[lane 2]"):
            name = "[lane 2] " + name
        frame = [name, 0.0]
        stack.append(frame)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            stack.pop()
            key = (name, self._shape() if not name.startswith("read (") else "all")
            self.seconds[key] += dt - frame[1]
            self.calls[key] += 1
            if stack:
                stack[-1][1] += dt

    def _wrap(self, fn, name: str, shape_from_jobs: bool = False):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if shape_from_jobs:  # matrix_rows(options, jobs, W0, W1, ...): the shape group being computed
                W0 = args[2]
                self.shape = "×".join(str(x) for x in W0.shape[-2:])
                if self.shape not in self.shapes:
                    self.shapes.append(self.shape)
            try:
                with self.stage(name):
                    return fn(*args, **kwargs)
            finally:
                if shape_from_jobs:
                    self.shape = "elementwise stream"

        return inner

    def __enter__(self) -> Stages:
        for mod, attr, name in WRAPPED:
            m = importlib.import_module(mod)
            orig = getattr(m, attr, None)
            if orig is None:  # an older tree (PYTHONPATH at it) without this step
                continue
            self._undo.append((m, attr, orig))
            setattr(m, attr, self._wrap(orig, name, shape_from_jobs=attr == "matrix_rows"))
        for attr, label in LAPACK:
            orig = getattr(torch.linalg, attr)
            self._undo.append((torch.linalg, attr, orig))
            setattr(torch.linalg, attr, self._wrap(orig, "› " + label))
        run = importlib.import_module("weightgeo.engine.run")
        orig_ra = run.ReadAhead
        stages = self

        class TimedReadAhead(orig_ra):  # type: ignore[misc, valid-type]
            def __iter__(self):
                it = super().__iter__()
                while True:
                    with stages.stage("read: wait in the main thread"):
                        try:
                            item = next(it)
                        except StopIteration:
                            return
                    yield item

        self._undo.append((run, "ReadAhead", orig_ra))
        run.ReadAhead = TimedReadAhead
        return self

    def __exit__(self, *exc: object) -> None:
        for m, attr, orig in reversed(self._undo):
            setattr(m, attr, orig)
        self._undo.clear()

    # -- output -------------------------------------------------------------------------------------------------
    def table(self, wall: float) -> str:
        cols = [*self.shapes, "elementwise stream"]
        cols = [c for c in cols if any(s == c for (_, s) in self.seconds)]
        names = [n for n in ORDER if any(k[0] == n for k in self.seconds)]
        names += sorted({n for n, _ in self.seconds} - set(names))
        lines = [
            "| stage | " + " | ".join(cols) + " | all (s) | share of wall |",
            "|---" * (len(cols) + 3) + "|",
        ]
        for n in names:
            cells = [self.seconds.get((n, c), 0.0) for c in cols]
            total = self.seconds.get((n, "all"), 0.0) + sum(cells)
            share = "" if n.startswith("read (") else f"{100 * total / wall:.1f} %"
            lines.append(
                f"| {n} | " + " | ".join(f"{x:.2f}" if x else "" for x in cells) + f" | {total:.2f} | {share} |"
            )
        lane1 = sum(v for (n, _), v in self.seconds.items() if not n.startswith(("read (", "[lane 2]")))
        lines.append(
            f"| main thread outside the stages (planning, opening, report) | {'| ' * len(cols)}"
            f"{wall - lane1:.2f} | {100 * (wall - lane1) / wall:.1f} % |"
        )
        lines.append(f"| **wall** | {'| ' * len(cols)}**{wall:.2f}** | 100 % |")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = defaultdict(dict)
        for (n, s), v in self.seconds.items():
            out[n][s] = round(v, 4)
        return dict(out)
