"""Exceptions raised by the format library. Every message is meant for a user."""
from __future__ import annotations


class KbitError(Exception):
    """Base class of every kbit error."""


class KbitValueError(KbitError, ValueError):
    """A bad argument or bad input values (NaN weights, k out of range, ...)."""


class KbitFormatError(KbitError):
    """A file that is not a valid kbit file: corrupt, truncated, inconsistent."""


class KbitVersionError(KbitFormatError):
    """A kbit file written with a format major version this reader does not know."""


class KbitChecksumError(KbitFormatError):
    """Stored bytes whose checksum does not match the one recorded at write time."""
