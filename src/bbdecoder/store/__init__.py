"""The run store: a versioned SQLite file written in batches and readable while training runs.

What it promises is written down in ``docs/cli_and_report.md`` ("What the run store promises"):
one writer at a time, readers need no write access, ``backup`` makes a single-file copy.
"""

from bbdecoder.store.backup import backup
from bbdecoder.store.reader import RunReader, open_run
from bbdecoder.store.schema import (
    DB_FILENAME,
    SCHEMA_VERSION,
    StoreError,
    StoreLockedError,
    StoreWriteWarning,
)
from bbdecoder.store.writer import RunWriter

__all__ = [
    "DB_FILENAME",
    "SCHEMA_VERSION",
    "RunReader",
    "RunWriter",
    "StoreError",
    "StoreLockedError",
    "StoreWriteWarning",
    "backup",
    "open_run",
]
