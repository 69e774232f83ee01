"""Every error eczema-batch raises on purpose.

An error's message says what went wrong and what to do next. The class docstring is the default
message; raise with a specific one where the details matter.
"""

from __future__ import annotations


class EczemaBatchError(Exception):
    """eczema-batch failed"""

    #: exit status the CLI uses (2: the user's input is wrong; 1: nothing could be done; 3: partly
    #: done)
    exit_code = 1

    def __init__(self, message: str | None = None, *, exit_code: int | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self)


class UsageError(EczemaBatchError):
    """the command was given something it cannot use"""

    exit_code = 2


class ConfigError(UsageError):
    """a setting is wrong: check the ECZEMA_BATCH_* environment variables"""


class StudyFolderError(UsageError):
    """the study folder does not exist or is not a folder"""


class UnknownPatientError(UsageError):
    """no such patient in the catalogue: `eczema-batch status` lists the studies"""


class RejectedFileError(EczemaBatchError):
    """the file cannot be catalogued

    Raised for one file; the batch records the reason and goes on.
    """


class CatalogueError(EczemaBatchError):
    """the catalogue cannot be used: run `eczema-batch db upgrade`"""


class ModelNotFoundError(EczemaBatchError):
    """model weights not found"""


class NoHeadError(UsageError):
    """no severity head trained: run `eczema-batch train`, or pass --head"""


class TransientError(EczemaBatchError):
    """a temporary failure (database or broker unreachable, device busy); retrying may succeed"""


class DiskFullError(EczemaBatchError):
    """a disk is full: free some space, then run the same command again (what was written before
    is kept)"""


class OutputPathError(UsageError):
    """cannot write there: give a folder of your own, with no symbolic link inside it"""
