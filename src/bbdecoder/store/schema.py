"""The run store's SQLite schema (version 1).

One file, ``<save_path>/run.sqlite``, in WAL mode, so another process can read it while training
writes. Every flush is one transaction, so a crash (even SIGKILL) loses at most the rows that were
not yet flushed and never leaves a half-written step.

Tables:

``schema_version(version)``
    one row: the schema version (:data:`SCHEMA_VERSION`).
``meta(key, value)``
    free-form run metadata (creation time, model class, bbdecoder version, ...).
``layers(layer_id, name, type, params, output_shape)``
    the model's leaf layers, IDs as in :class:`bbdecoder.layers.LayerIndex`.
``series(series_id, layer_id, param)``
    one row per recorded tensor: ``param`` is the parameter's qualified ``state_dict`` name, or
    ``""`` for statistics of a layer's output (activations).
``stat_names(stat_id, name)``
    the statistic names used in ``scalars`` and ``epoch_scalars``.
``steps(step, epoch, time, loss)``
    one row per recorded step (written in the same transaction as the step's scalars).
``scalars(step, epoch, series_id, stat_id, value)``
    per-step values (gradient statistics, update ratios, weight statistics at epoch ends, ...).
``epoch_scalars(epoch, series_id, stat_id, agg, value)``
    per-epoch aggregates across iterations: ``agg`` is ``"mean"`` or ``"var"`` (population).
``histograms(step, epoch, series_id, kind, lo, hi, nbins, counts)``
    histograms on fixed bins: ``counts`` is ``nbins`` little-endian int64; values outside
    ``[lo, hi]`` are counted in the first or last bin.
``events(event_id, step, epoch, time, kind, layer_id, param, message, data)``
    warnings and reports (non-finite gradients, pruning, ...); ``data`` is JSON.
``artifacts(name, kind, content)``
    text artifacts (the function graph as text and DOT).
``blobs(blob_id, step, epoch, time, kind, name, layer_id, meta, data)``
    binary records: arrays saved with ``numpy.save`` (``kind`` ``"features"`` for a layer's output
    recorded by ``get_inter_features``), PNG images (``"image"``), JSON tables (``"table"``);
    ``meta`` is JSON (shape, dtype, mime type, ...). Written immediately, one transaction each.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
DB_FILENAME = "run.sqlite"

DDL = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS layers (
    layer_id INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL,
    params INTEGER NOT NULL, output_shape TEXT
);
CREATE TABLE IF NOT EXISTS series (
    series_id INTEGER PRIMARY KEY, layer_id INTEGER NOT NULL, param TEXT NOT NULL,
    UNIQUE (layer_id, param)
);
CREATE TABLE IF NOT EXISTS stat_names (stat_id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, time REAL NOT NULL, loss REAL
);
CREATE TABLE IF NOT EXISTS scalars (
    step INTEGER NOT NULL, epoch INTEGER NOT NULL, series_id INTEGER NOT NULL,
    stat_id INTEGER NOT NULL, value REAL
);
CREATE INDEX IF NOT EXISTS scalars_step ON scalars (step);
CREATE TABLE IF NOT EXISTS epoch_scalars (
    epoch INTEGER NOT NULL, series_id INTEGER NOT NULL, stat_id INTEGER NOT NULL,
    agg TEXT NOT NULL, value REAL
);
CREATE TABLE IF NOT EXISTS histograms (
    step INTEGER NOT NULL, epoch INTEGER NOT NULL, series_id INTEGER NOT NULL, kind TEXT NOT NULL,
    lo REAL NOT NULL, hi REAL NOT NULL, nbins INTEGER NOT NULL, counts BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER, epoch INTEGER, time REAL NOT NULL,
    kind TEXT NOT NULL, layer_id INTEGER, param TEXT, message TEXT NOT NULL, data TEXT
);
CREATE TABLE IF NOT EXISTS artifacts (name TEXT PRIMARY KEY, kind TEXT NOT NULL, content TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    blob_id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER, epoch INTEGER, time REAL NOT NULL,
    kind TEXT NOT NULL, name TEXT NOT NULL, layer_id INTEGER, meta TEXT NOT NULL, data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_kind_name ON blobs (kind, name);
"""


APPLICATION_ID = 0x62624452
"""``PRAGMA application_id`` of a bbdecoder run store (``"bbDR"``), set when a store is created."""

STORE_TABLES = frozenset(
    {
        "schema_version", "meta", "layers", "series", "stat_names", "steps", "scalars",
        "epoch_scalars", "histograms", "events", "artifacts", "blobs",
    }
)  # fmt: skip
"""The tables every bbdecoder run store has (``sqlite_sequence`` comes with AUTOINCREMENT)."""


class StoreError(RuntimeError):
    """The run store is missing, of an unknown schema version, or otherwise unusable; the message
    names the path and the fix."""


class StoreLockedError(StoreError):
    """Another writer holds the run store (the message names its pid, host and start time)."""


class StoreWriteWarning(RuntimeWarning):
    """Writing the run store failed (full disk, read-only folder, ...): training goes on, the rows
    are kept in memory (bounded) and written when the store is writable again."""
