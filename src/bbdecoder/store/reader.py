"""RunReader: read a run store (also while another process is still writing it)."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from bbdecoder.store.connection import (
    connect_readonly,
    db_path,
    store_kind,
    table_list,
    tidy_after_read,
    wal_path,
)
from bbdecoder.store.schema import SCHEMA_VERSION, StoreError
from bbdecoder.store.vocabulary import GRAD_STATS, WEIGHT_HISTOGRAM

SCALAR_COLUMNS = ["step", "epoch", "layer_id", "layer", "param", "stat", "value"]
EPOCH_COLUMNS = ["epoch", "layer_id", "layer", "param", "stat", "agg", "value"]
HISTOGRAM_COLUMNS = ["step", "epoch", "layer_id", "layer", "param", "kind", "bin", "left", "right", "count"]


class RunReader:
    """Read-only view of one run store. Every method queries the file afresh (sees new flushes).

    ``param`` is the parameter's qualified ``state_dict`` name, or ``""`` for statistics of a
    layer's output (activations). NaN values are stored as SQL NULL and come back as NaN.
    """

    def __init__(self, save_path: str | Path) -> None:
        self.path = db_path(save_path)
        from bbdecoder.store.background import wait_for_writer

        wait_for_writer(self.path)  # an open writer of this process: read what it was given so far
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a run store file: pass its parent folder")
        if not self.path.exists():
            raise StoreError(f"no run store at {self.path}: pass the save_path given to Analyzer")
        self._tidy = not wal_path(self.path).exists()  # a finished store: leave no -wal/-shm behind
        self._conn = connect_readonly(self.path)
        try:
            kind = store_kind(self._conn)
            if kind != "store":
                detail = "an empty database" if kind == "empty" else f"tables: {table_list(self._conn)}"
                raise StoreError(f"{self.path} is not a bbdecoder run store ({detail})")
            versions = [row[0] for row in self._conn.execute("SELECT version FROM schema_version")]
        except StoreError:
            self.close()
            raise
        except sqlite3.Error as err:
            self.close()
            raise StoreError(f"cannot read the run store {self.path}: {err}") from err
        if versions != [SCHEMA_VERSION]:
            self.close()
            raise StoreError(f"{self.path} has schema version {versions}; this reader reads {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[RunReader]:
        """Within this block every query sees the same consistent state of the store, even while
        another process keeps writing (one SQLite read transaction)."""
        self._conn.execute("BEGIN")
        try:
            yield self
        finally:
            self._conn.execute("COMMIT")

    def _frame(self, sql: str, columns: list[str], params: tuple[object, ...] = ()) -> pd.DataFrame:
        rows = self._conn.execute(sql, params).fetchall()
        return pd.DataFrame(rows, columns=columns)

    def scalars(self, stat: str | None = None) -> pd.DataFrame:
        """Long table, one row per value: columns ``step, epoch, layer_id, layer, param, stat, value``.

        ``stat`` restricts to one statistic name (``mean``, ``mean_abs``, ``max_abs``, ``var``, ``l1``,
        ``l2``, ``update_ratio``, ``weight_*``, ``dead_fraction``, ...).
        """
        where, params = ("WHERE n.name = ?", (stat,)) if stat is not None else ("", ())
        df = self._frame(
            "SELECT s.step, s.epoch, r.layer_id, COALESCE(l.name, ''), r.param, n.name, s.value "
            "FROM scalars s JOIN series r USING (series_id) JOIN stat_names n USING (stat_id) "
            f"LEFT JOIN layers l ON l.layer_id = r.layer_id {where} ORDER BY s.step, r.series_id, s.stat_id",
            SCALAR_COLUMNS,
            params,
        )
        df["value"] = df["value"].astype(float)
        return df

    def epoch_scalars(self) -> pd.DataFrame:
        """Per-epoch aggregates across iterations: ``epoch, layer_id, layer, param, stat, agg, value``
        with ``agg`` in ``{"mean", "var"}`` (population variance over the epoch's steps)."""
        df = self._frame(
            "SELECT e.epoch, r.layer_id, COALESCE(l.name, ''), r.param, n.name, e.agg, e.value "
            "FROM epoch_scalars e JOIN series r USING (series_id) JOIN stat_names n USING (stat_id) "
            "LEFT JOIN layers l ON l.layer_id = r.layer_id ORDER BY e.epoch, r.series_id, e.stat_id",
            EPOCH_COLUMNS,
        )
        df["value"] = df["value"].astype(float)
        return df

    def histograms(self, kind: str | None = None) -> pd.DataFrame:
        """Long table, one row per bin: ``step, epoch, layer_id, layer, param, kind, bin, left, right,
        count``. Bins are fixed per series; values outside the range are counted in the end bins."""
        where, params = ("WHERE h.kind = ?", (kind,)) if kind is not None else ("", ())
        rows = self._conn.execute(
            "SELECT h.step, h.epoch, r.layer_id, COALESCE(l.name, ''), r.param, h.kind, h.lo, h.hi, "
            "h.nbins, h.counts FROM histograms h JOIN series r USING (series_id) "
            f"LEFT JOIN layers l ON l.layer_id = r.layer_id {where} ORDER BY h.step, r.series_id",
            params,
        ).fetchall()
        frames = []
        for step, epoch, layer_id, layer, param, hkind, lo, hi, nbins, blob in rows:
            edges = np.linspace(lo, hi, nbins + 1)
            frames.append(
                pd.DataFrame(
                    {
                        "step": step,
                        "epoch": epoch,
                        "layer_id": layer_id,
                        "layer": layer,
                        "param": param,
                        "kind": hkind,
                        "bin": np.arange(nbins),
                        "left": edges[:-1],
                        "right": edges[1:],
                        "count": np.frombuffer(blob, dtype="<i8"),
                    }
                )
            )
        if not frames:
            return pd.DataFrame(columns=HISTOGRAM_COLUMNS)
        return pd.concat(frames, ignore_index=True)[HISTOGRAM_COLUMNS]

    def weight_histograms(self) -> pd.DataFrame:
        """The per-epoch weight histograms: :meth:`histograms` of kind
        :data:`~bbdecoder.store.vocabulary.WEIGHT_HISTOGRAM`."""
        return self.histograms(kind=WEIGHT_HISTOGRAM)

    def gradient_scalars(self) -> pd.DataFrame:
        """The per-step gradient statistics (:data:`~bbdecoder.store.vocabulary.GRAD_STATS`) of
        every parameter tensor: :meth:`scalars` rows, same columns."""
        frame = self.scalars()
        return frame[frame.stat.isin(GRAD_STATS) & (frame.param != "") & (frame.layer_id >= 0)]

    def events(self, kind: str | None = None) -> pd.DataFrame:
        """Warnings and reports: ``event_id, step, epoch, time, kind, layer_id, layer, param, message,
        data`` (``data`` decoded from JSON)."""
        where, params = ("WHERE e.kind = ?", (kind,)) if kind is not None else ("", ())
        df = self._frame(
            "SELECT e.event_id, e.step, e.epoch, e.time, e.kind, e.layer_id, l.name, e.param, e.message, "
            f"e.data FROM events e LEFT JOIN layers l ON l.layer_id = e.layer_id {where} ORDER BY e.event_id",
            ["event_id", "step", "epoch", "time", "kind", "layer_id", "layer", "param", "message", "data"],
            params,
        )
        df["data"] = [json.loads(d) if d is not None else None for d in df["data"]]
        return df

    def layers(self) -> pd.DataFrame:
        """The model's leaf layers: ``layer_id, name, type, params, output_shape``."""
        return self._frame(
            "SELECT layer_id, name, type, params, output_shape FROM layers ORDER BY layer_id",
            ["layer_id", "name", "type", "params", "output_shape"],
        )

    def steps(self) -> pd.DataFrame:
        """One row per stored step: ``step, epoch, time, loss``."""
        return self._frame(
            "SELECT step, epoch, time, loss FROM steps ORDER BY step", ["step", "epoch", "time", "loss"]
        )

    def meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())

    def artifact(self, name: str) -> str:
        """A stored text artifact (e.g. ``"graph.txt"``, ``"graph.dot"``)."""
        row = self._conn.execute("SELECT content FROM artifacts WHERE name = ?", (name,)).fetchone()
        if row is None:
            names = [r[0] for r in self._conn.execute("SELECT name FROM artifacts")]
            raise KeyError(f"no artifact {name!r} in this run; stored: {names}")
        return str(row[0])

    def blobs(self, kind: str | None = None, name: str | None = None) -> pd.DataFrame:
        """Binary records without their payload: ``blob_id, step, epoch, time, kind, name, layer_id,
        meta`` (``meta`` decoded from JSON), in the order they were written."""
        clauses = [(c, v) for c, v in (("kind = ?", kind), ("name = ?", name)) if v is not None]
        where = ("WHERE " + " AND ".join(c for c, _ in clauses)) if clauses else ""
        df = self._frame(
            f"SELECT blob_id, step, epoch, time, kind, name, layer_id, meta FROM blobs {where} "
            "ORDER BY blob_id",
            ["blob_id", "step", "epoch", "time", "kind", "name", "layer_id", "meta"],
            tuple(v for _, v in clauses),
        )
        df["meta"] = [json.loads(m) for m in df["meta"]]
        return df

    def blob(self, blob_id: int) -> bytes:
        """The payload of one binary record."""
        row = self._conn.execute("SELECT data FROM blobs WHERE blob_id = ?", (int(blob_id),)).fetchone()
        if row is None:
            raise KeyError(f"no blob with id {blob_id} in this run")
        return bytes(row[0])

    def array(self, blob_id: int) -> np.ndarray:
        """A stored array (see ``RunWriter.add_array``)."""
        return np.load(io.BytesIO(self.blob(blob_id)), allow_pickle=False)

    def epochs(self) -> list[int]:
        """Epoch numbers that have at least one stored step, ascending."""
        return [int(r[0]) for r in self._conn.execute("SELECT DISTINCT epoch FROM steps ORDER BY epoch")]

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` result (``"ok"`` for a sound file)."""
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])

    def _export_tables(self, *, with_events: bool) -> list[tuple[str, pd.DataFrame]]:
        tables = [
            ("scalars", self.scalars()),
            ("epoch_scalars", self.epoch_scalars()),
            ("histograms", self.histograms()),
            ("events", self.events()),
            ("layers", self.layers()),
        ]
        return [(name, frame) for name, frame in tables if with_events or name != "events"]

    def to_csv(self, folder: str | Path) -> list[Path]:
        """Export scalars, epoch aggregates, histograms, events and layers as CSV files; returns paths."""
        return self._write_tables(folder, "csv", with_events=True)

    def to_parquet(self, folder: str | Path) -> list[Path]:
        """Export the same tables as :meth:`to_csv` but events (free-form JSON) as Parquet files
        (needs ``pyarrow``)."""
        try:
            import pyarrow  # noqa: F401
        except ImportError as err:
            raise ImportError("Parquet export needs pyarrow: pip install pyarrow (or use to_csv)") from err
        return self._write_tables(folder, "parquet", with_events=False)

    def _write_tables(self, folder: str | Path, suffix: str, *, with_events: bool) -> list[Path]:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, frame in self._export_tables(with_events=with_events):
            path = out / f"{name}.{suffix}"
            if suffix == "csv":
                frame.to_csv(path, index=False)
            else:
                frame.to_parquet(path, index=False)
            paths.append(path)
        return paths

    def backup(self, dest: str | Path) -> Path:
        """A consistent single-file copy of this store at ``dest`` (see :func:`bbdecoder.store.backup`)."""
        from bbdecoder.store.backup import backup_connection

        return backup_connection(self._conn, self.path, dest)

    def close(self) -> None:
        self._conn.close()
        if self._tidy:
            self._tidy = False
            tidy_after_read(self.path)

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_run(save_path: str | Path) -> RunReader:
    """Open the run store in ``save_path`` (a folder given to ``Analyzer``, or the ``.sqlite`` file)."""
    return RunReader(save_path)
