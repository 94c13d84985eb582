"""The buffer in shared memory: slots and their states, sampling, segment files and their space."""
from .buffer import NotReady, SharedActivationBuffer
from .groups import GroupRefused
from .layout import BufferSpec
from .segment import BufferSpaceError

__all__ = ["BufferSpaceError", "BufferSpec", "GroupRefused", "NotReady", "SharedActivationBuffer"]
