"""``bbdecoder serve``: the report page served live from the run store while training writes it.

Safe by default: binds 127.0.0.1; every request needs the access token (random, printed in the URL
as Jupyter does, or given with ``--token``) as ``?token=`` or an ``Authorization: token ...``
header: none gives 401, a wrong one 403. The store is opened read-only (SQLite ``mode=ro`` and
``query_only``). Runs are addressed by name from a table built at start-up and refreshed when a new
run folder appears; no request path or parameter is ever joined to a file path, so nothing outside
the run folders can be read. Only ``GET`` is served.

Routes: ``/`` (the page of run ``?run=NAME``, default the first), ``/api/payload?run=NAME`` (the
page's chart data, latest step and alerts as JSON; the page polls it), ``/api/runs``.
"""

from __future__ import annotations

import hmac
import json
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, quote, urlsplit

from bbdecoder.report import html
from bbdecoder.report.builder import collect, render_report
from bbdecoder.report.charts import MAX_POINTS, to_json
from bbdecoder.store.reader import RunReader
from bbdecoder.store.schema import DB_FILENAME, StoreError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ReadOnlyRunReader(RunReader):
    """A :class:`RunReader` (SQLite ``mode=ro``: the operating system sees a read-only open) with
    ``query_only`` set, that never opens the store for writing, not even to tidy up ``-wal``/``-shm``
    files on close."""

    def __init__(self, store: Path) -> None:
        super().__init__(store)
        self._tidy = False
        self._conn.execute("PRAGMA query_only = 1")

    def data_version(self) -> int:
        """Changes whenever another connection commits to the store (SQLite ``data_version``)."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])


def discover_runs(root: Path) -> dict[str, Path]:
    """Run stores under ``root``: ``root`` itself when it holds ``run.sqlite`` (named after the
    folder), else every folder one or two levels below that does, named by relative path."""
    root = root.resolve()
    if (root / DB_FILENAME).is_file():
        return {root.name or "run": root / DB_FILENAME}
    found = sorted(p for pattern in (f"*/{DB_FILENAME}", f"*/*/{DB_FILENAME}") for p in root.glob(pattern))
    return {p.parent.relative_to(root).as_posix(): p for p in found if p.is_file()}


@dataclass
class _Run:
    store: Path
    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: ReadOnlyRunReader | None = None
    version: int | None = None
    payload: bytes = b""
    built_at: float = 0.0
    build_seconds: float = 0.0


class Dashboard:
    """The live dashboard's state: the run table, the token, cached payloads per run.

    Args:
        root: a run folder (holding ``run.sqlite``) or a folder of run folders.
        token: the access token (default: 32 random URL-safe characters).
        interval_ms: how often the page polls for new data.
        max_points: largest number of x positions per chart (as in the report).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        token: str | None = None,
        interval_ms: int = 1000,
        max_points: int = MAX_POINTS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder; pass a run folder or a folder of runs")
        self.token = token or secrets.token_urlsafe(24)
        self.interval_ms = interval_ms
        self.max_points = max_points
        self._runs: dict[str, _Run] = {}
        self._table_lock = threading.Lock()
        self.refresh_runs()
        if not self._runs:
            raise StoreError(f"no run store ({DB_FILENAME}) in {root} or the folders below it")

    def refresh_runs(self) -> list[str]:
        """Re-scan the root for new run folders; returns every run name."""
        with self._table_lock:
            for name, store in discover_runs(self.root).items():
                self._runs.setdefault(name, _Run(store))
            return list(self._runs)

    def authorised(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())

    def run(self, name: str | None) -> tuple[str, _Run] | None:
        names = self.refresh_runs() if name not in self._runs else list(self._runs)
        chosen = names[0] if name is None else name
        entry = self._runs.get(chosen)
        return None if entry is None else (chosen, entry)

    def _reader(self, entry: _Run) -> ReadOnlyRunReader:
        if entry.reader is None:
            entry.reader = ReadOnlyRunReader(entry.store)
        return entry.reader

    def payload(self, name: str, entry: _Run) -> bytes:
        """The JSON payload of one run, recomputed only when the store changed, and for a large run
        (a slow rebuild) at most every twice its build time, so polling never queues rebuilds."""
        with entry.lock:
            reader = self._reader(entry)
            version = reader.data_version()
            now = time.monotonic()
            stale = version != entry.version or not entry.payload
            if stale and (not entry.payload or now - entry.built_at >= 2 * entry.build_seconds):
                _, payload = collect(reader, max_points=self.max_points)
                payload["run"] = name
                entry.payload, entry.version = to_json(payload).encode(), version
                entry.built_at, entry.build_seconds = time.monotonic(), time.monotonic() - now
            return entry.payload

    def page(self, name: str, entry: _Run) -> bytes:
        """The report page of one run, polling its payload."""
        token = quote(self.token)
        live = {"url": f"/api/payload?run={quote(name)}&token={token}", "interval_ms": self.interval_ms}
        links = " ".join(
            f'<a class="bbd-run{" current" if other == name else ""}" '
            f'href="/?run={quote(other)}&amp;token={token}">{html.esc(other)}</a>'
            for other in self._runs
        )
        picker = f'<p class="bbd-live" id="run-picker">runs: {links}</p>'
        with entry.lock:
            text = render_report(
                self._reader(entry),
                title=f"bbdecoder live: {name}",
                max_points=self.max_points,
                live=live,
                header_extra=picker,
            )
        return text.encode("utf-8")

    def close(self) -> None:
        for entry in self._runs.values():
            with entry.lock:
                if entry.reader is not None:
                    entry.reader.close()
                    entry.reader = None


def _handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "bbdecoder"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # quiet: stdout carries the URL only
            return

        def _send(
            self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8"
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Frame-Options", "DENY")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _token(self, query: dict[str, list[str]]) -> str | None:
            header = self.headers.get("Authorization", "")
            if header.lower().startswith("token "):
                return header[6:].strip()
            values = query.get("token")
            return values[0] if values else None

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            presented = self._token(query)
            if presented is None:
                self._send(HTTPStatus.UNAUTHORIZED, b"401: this dashboard needs its token (?token=...)\n")
                return
            if not dashboard.authorised(presented):
                self._send(HTTPStatus.FORBIDDEN, b"403: wrong token\n")
                return
            routes: dict[str, Callable[[], None]] = {
                "/": lambda: self._page(query),
                "/index.html": lambda: self._page(query),
                "/api/payload": lambda: self._payload(query),
                "/api/runs": self._runs,
            }
            route = routes.get(parts.path)
            if route is None:
                self._send(HTTPStatus.NOT_FOUND, b"404: not found\n")
                return
            try:
                route()
            except (StoreError, sqlite3.Error) as err:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"503: {err}\n".encode())

        do_HEAD = do_GET

        def _chosen(self, query: dict[str, list[str]]) -> tuple[str, _Run] | None:
            name = query.get("run", [None])[0]
            found = dashboard.run(name)
            if found is None:
                self._send(HTTPStatus.NOT_FOUND, b"404: no such run\n")
            return found

        def _page(self, query: dict[str, list[str]]) -> None:
            found = self._chosen(query)
            if found is not None:
                self._send(HTTPStatus.OK, dashboard.page(*found), "text/html; charset=utf-8")

        def _payload(self, query: dict[str, list[str]]) -> None:
            found = self._chosen(query)
            if found is not None:
                self._send(HTTPStatus.OK, dashboard.payload(*found), "application/json")

        def _runs(self) -> None:
            body = json.dumps({"runs": dashboard.refresh_runs()}).encode()
            self._send(HTTPStatus.OK, body, "application/json")

        def do_POST(self) -> None:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"405: read-only\n")

        do_PUT = do_DELETE = do_PATCH = do_POST

    return Handler


def make_server(dashboard: Dashboard, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server for ``dashboard`` bound to ``host:port`` (``port=0``: a free port)."""
    server = ThreadingHTTPServer((host, port), _handler(dashboard))
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer, dashboard: Dashboard) -> str:
    address = server.server_address
    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    port = address[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={quote(dashboard.token)}"


def serve(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    interval_ms: int = 1000,
    out: TextIO | None = None,
) -> None:
    """Serve the live dashboard until interrupted; the URL (token included) is the first line written
    to ``out`` (default stdout), flushed at once."""
    stream = out or sys.stdout
    dashboard = Dashboard(root, token=token, interval_ms=interval_ms)
    server = make_server(dashboard, host, port)
    print(url_of(server, dashboard), file=stream, flush=True)
    if host not in LOOPBACK:
        print(
            f"warning: listening on {host}, reachable from other machines; anyone with the URL can read "
            "the runs",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"serving {len(dashboard.refresh_runs())} run(s) from {root}; Ctrl-C stops", file=stream, flush=True
    )
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        dashboard.close()
