"""Typed errors.  Each carries a one-line user message and an exit code; the CLI
prints ``unionfuse: <message>`` and exits with the code."""

from __future__ import annotations


class UnionfuseError(Exception):
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(UnionfuseError):
    exit_code = 2


class MountError(UnionfuseError):
    exit_code = 32  # like mount(8): "mount failure"


class NotMountedError(UnionfuseError):
    exit_code = 32
