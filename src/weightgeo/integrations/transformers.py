"""A ``transformers.TrainerCallback`` that runs a :class:`~weightgeo.track.Tracker` during ``Trainer.train()``.

>>> from weightgeo.integrations.transformers import WeightGeoCallback   # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=ds)          # doctest: +SKIP
>>> cb = WeightGeoCallback.attach(trainer, every=64, include="attention")  # doctest: +SKIP
>>> trainer.train()                                                      # doctest: +SKIP
>>> cb.tracker.rank_curve().summary["curves"]["stable_rank"]             # doctest: +SKIP

The tracker is created at ``on_train_begin`` from the model as it is then (W0). On every step that is a
multiple of ``every`` (``state.global_step``) ``on_step_end`` calls ``tracker.update`` and logs the flat dict:

* with a trainer (``WeightGeoCallback.attach(trainer, ...)`` or ``trainer=``): through ``trainer.log``, so every
  reporter (TensorBoard, W&B, ...) and ``state.log_history`` get it at that step;
* without one: the metrics are merged into the next ``on_log`` call's ``logs`` (seen by the reporters that run
  after this callback) and appended to ``state.log_history``.

Only the main process computes (``state.is_world_process_zero``), except with ``gather=True`` (DTensor
parameters), where every rank must take part in the gather.

What it measures is what the run saves: the HF Trainer, and the TRL trainers built on it (``SFTTrainer``,
``GRPOTrainer``, ``DistillationTrainer``, ...), save checkpoints with ``save_pretrained`` of the model's parameters
as they are (fp32 masters in fp32, a bf16-loaded model in bf16, DeepSpeed's 16-bit engine weights in 16 bits), so
the Tracker rounds nothing by default (``dtype=None``: each parameter's own dtype) and its curves equal
:func:`~weightgeo.rank_curve` of the run's ``checkpoint-N`` folders (tested inside those TRL trainers). Pass
``dtype=torch.bfloat16`` to see what bf16 copies of fp32 masters would show instead.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ..errors import WeightgeoError
from ..track import Tracker

__all__ = ["WeightGeoCallback"]

C = TypeVar("C", bound="_WeightGeoCallback")

_MISSING = (
    "weightgeo.integrations.transformers.WeightGeoCallback needs the transformers package "
    "(pip install transformers); the rest of weightgeo, including weightgeo.Tracker, works without it"
)

try:
    from transformers import TrainerCallback
except ImportError as _err:  # the module stays importable (docs, doctest collection); the class is not
    _IMPORT_ERROR: ImportError | None = _err

    def __getattr__(name: str) -> Any:
        if name == "WeightGeoCallback":
            raise ImportError(_MISSING) from _IMPORT_ERROR
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    _IMPORT_ERROR = None


def _define(base: type) -> type:
    return type(
        "WeightGeoCallback", (_WeightGeoCallback, base), {"__doc__": _WeightGeoCallback.__doc__, "__module__": __name__}
    )


class _WeightGeoCallback:
    """Track ΔW_t of the trained model and log ``weightgeo/...`` metrics.

    Args:
        trainer: optional ``Trainer`` whose ``log`` is used (see the module doc).
        save_path: if given, the tracker is saved there at ``on_train_end`` (``Tracker.load`` reads it).
        **tracker_kwargs: passed to :class:`~weightgeo.track.Tracker` (``every``, ``k``, ``include``, ``mode``,
            ``device``, ...).
    """

    def __init__(self, *, trainer: Any = None, save_path: str | None = None, **tracker_kwargs: Any) -> None:
        self.trainer = trainer
        self.save_path = save_path
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Tracker | None = None
        self._pending: dict[str, float] = {}
        self._gather = bool(tracker_kwargs.get("gather", False))

    @classmethod
    def attach(cls: type[C], trainer: Any, **kwargs: Any) -> C:
        """Create the callback, register it with ``trainer.add_callback`` and log through ``trainer.log``."""
        cb = cls(trainer=trainer, **kwargs)
        trainer.add_callback(cb)
        return cb

    def _active(self, state: Any) -> bool:
        return self._gather or bool(getattr(state, "is_world_process_zero", True))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.tracker is None and self._active(state):
            if model is None:
                raise WeightgeoError("WeightGeoCallback.on_train_begin got no model; the Trainer passes model=...")
            self.tracker = Tracker(model, **self.tracker_kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.tracker is None or model is None:
            return
        logs = self.tracker.update(model.named_parameters(), int(state.global_step))
        if not logs or not bool(getattr(state, "is_world_process_zero", True)):
            return
        if self.trainer is not None:
            self.trainer.log(dict(logs))
        else:
            self._pending.update(logs)
            history = getattr(state, "log_history", None)
            if history is not None:
                history.append({**logs, "step": int(state.global_step)})

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self._pending and logs is not None:
            logs.update(self._pending)
            self._pending = {}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None and self.save_path and bool(getattr(state, "is_world_process_zero", True)):
            self.tracker.save(self.save_path)


if _IMPORT_ERROR is None:
    WeightGeoCallback = _define(TrainerCallback)
