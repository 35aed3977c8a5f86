"""User-facing error types.

Every error a user can cause (a bad path, a corrupt file, an unsupported
architecture, a malformed KV spec, a prompt that does not fit) is raised as a
subclass of :class:`LongctxError` with a message that names the problem. The
CLI prints these messages without a stack trace; anything else is a bug.
"""

from __future__ import annotations


class LongctxError(Exception):
    """Base class for errors caused by user input, reported without a traceback."""


class CheckpointError(LongctxError):
    """A model file or folder is missing, corrupt or unsupported."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture is not one longctx implements."""


class PromptTooLongError(LongctxError):
    """A prompt (plus the tokens to generate) exceeds the model's context."""


class SpecError(LongctxError, ValueError):
    """A KV spec string or value is malformed."""


class OutOfBlocksError(LongctxError):
    """The KV block pool has no free block left for a request."""


class QueueFullError(LongctxError):
    """The engine's waiting queue is at its bound; retry later."""


class RequestTooLargeError(LongctxError):
    """A request needs more KV memory than the whole pool holds."""
