"""Exceptions raised by flexprefill. Each names the argument at fault in ``.argument``."""

from typing import Optional


class FlexPrefillError(Exception):
    """Base class of every flexprefill error."""

    def __init__(self, message: str, argument: Optional[str] = None):
        super().__init__(message)
        #: The argument at fault (``"q"``, ``"cu_seqlens_k"``, ``"gamma"``, ...), or None.
        self.argument = argument


class InvalidInputError(FlexPrefillError, ValueError):
    """A dtype, device mix, layout, shape, cu_seqlens or knob the call cannot take."""


class DeviceError(FlexPrefillError, RuntimeError):
    """The device cannot run the call (no usable GPU, CUDA not in this build, ...)."""
