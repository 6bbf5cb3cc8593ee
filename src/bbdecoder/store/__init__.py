"""The run store: a versioned SQLite file written in batches and readable while training runs."""

from bbdecoder.store.reader import RunReader, open_run
from bbdecoder.store.schema import DB_FILENAME, SCHEMA_VERSION, StoreError
from bbdecoder.store.writer import RunWriter

__all__ = ["DB_FILENAME", "SCHEMA_VERSION", "RunReader", "RunWriter", "StoreError", "open_run"]
