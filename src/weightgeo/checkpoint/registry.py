"""The format registry: every checkpoint format weightgeo reads, in the order it is tried.

:func:`~weightgeo.checkpoint.open_checkpoint` opens a source with the first format that recognises it (a format
may hand back another source to open instead: a hub id its snapshot folder), then lets every wrapping format
recognise the result; :func:`~weightgeo.checkpoint.completeness.checkpoint_status` runs every format's
completeness check on a folder. Both read :data:`FORMATS` when called.

====================  ===========================================================================================
format                recognised by
====================  ===========================================================================================
``state_dict``        type: a ``{name: Tensor}`` mapping, an ``nn.Module``
``hub``               a string that is no local path and looks like ``org/name[@revision]``
``lora``              ``adapter_config.json`` (the file, or a folder with it and ``base=`` or no HF weights)
``hf``                ``model.safetensors`` / ``pytorch_model.bin`` [+ index], any ``*.safetensors``; weight files
``verl``              ``model_world_size_W_rank_R.pt`` / ``fsdp_config.json`` in the folder or its ``actor/``
``deepspeed``         ``mp_rank_00_model_states.pt``, ``zero_pp_rank_R_mp_rank_00_model_states.pt``
``dcp``               ``.metadata`` (Megatron/slime and torchtitan names mapped); Megatron layouts it refuses
``fp8`` (wraps)       an opened checkpoint with float8 weights and their scales; packed-integer ones (refused)
====================  ===========================================================================================

Adding a format is one module that defines its :class:`~weightgeo.checkpoint.format.Format` and one line here.

>>> [f.name for f in FORMATS]
['state_dict', 'hub', 'lora', 'hf', 'verl', 'deepspeed', 'dcp', 'fp8']
"""

from __future__ import annotations

from pathlib import Path

from ..errors import WeightgeoError
from . import dcp, deepspeed, fp8, hf, hub, lora, state_dict, verl
from .format import Format, Source

__all__ = ["FORMATS", "recognise", "is_checkpoint_folder"]

#: every format, in the order it is tried (a format recognising a folder that a later one would too comes first)
FORMATS: tuple[Format, ...] = (
    state_dict.FORMAT,
    hub.FORMAT,
    lora.FORMAT,
    hf.FORMAT,
    verl.FORMAT,
    deepspeed.FORMAT,
    dcp.FORMAT,
    fp8.FORMAT,
)


def recognise(source: Source, *, wraps: bool = False) -> Format | None:
    """The first format (of the wrapping ones with ``wraps``) that recognises ``source``, else ``None``."""
    return next((f for f in FORMATS if f.wraps == wraps and f.recognise(source)), None)


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether a format recognises ``folder`` as one checkpoint (or recognises it and finds it bad: a format
    that refuses a folder has claimed it); for messages about run folders.

    >>> is_checkpoint_folder(Path("."))
    False
    """
    try:
        return recognise(Source(Path(folder), str(folder))) is not None
    except WeightgeoError:
        return True
