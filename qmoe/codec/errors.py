"""The codec's error type."""


class CodecError(ValueError):
    """A compressed matrix or dictionary violates codec/FORMAT.md; the message names what and where."""
