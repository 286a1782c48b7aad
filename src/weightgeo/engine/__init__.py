"""The streaming pass over checkpoints: ``compare`` and ``compare_many`` are one runner (:mod:`.run`).

Files: :mod:`.plan` (the :class:`Plan` from headers, work units, shape groups), :mod:`.reading` (stacks, row chunks, read-ahead budget), :mod:`.groups`
(the rows of a shape group and of a row-chunk stream), :mod:`.report` (the Report of one comparison),
:mod:`.run` (the pass). This package is the only place that knows about reading order, batching, devices and
ranks; the kernels it calls are the pure tensor functions of :mod:`weightgeo.metrics`. Its options are
:class:`weightgeo.options.PairOptions`.
"""

from __future__ import annotations

from .plan import Job, Plan, plan_pair
from .run import compare, compare_many, run

__all__ = [
    "compare",
    "compare_many",
    "run",
    "Job",
    "Plan",
    "plan_pair",
]
