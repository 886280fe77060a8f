"""What a worker does with a downlink it cannot use: never train on it, never crash on it.

A model from the PS that is not finite (or that the codecs refuse to encode a gradient of)
ends the session; the worker reconnects for a full model, and gives up with a clear error
after ``max_reconnects`` sessions instead of dying on an uncaught CodecError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np

from gradwire.compressors.base import CodecError
from gradwire.compressors.finite import all_finite
from gradwire.compressors.update import InvalidUpdate
from gradwire.protocol import MalformedMessage


class UnusableDownlink(RuntimeError):
    """The PS sent something this worker cannot train on."""


# Errors of one session that a new session (a fresh model, reset codec state) may cure.
SESSION_ERRORS = (UnusableDownlink, CodecError, InvalidUpdate, MalformedMessage)


ParamsT = TypeVar("ParamsT", bound=Mapping[str, np.ndarray])


def usable_model(params: ParamsT, where: str) -> ParamsT:
    bad = [name for name, a in params.items() if not all_finite(a)]
    if bad:
        raise UnusableDownlink(f"the model in the {where} has NaN or Inf entries in {bad[:3]}")
    return params
