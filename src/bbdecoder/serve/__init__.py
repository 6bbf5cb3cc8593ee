"""The live dashboard (``bbdecoder serve RUN_DIR``): the report page served from the run store while
training writes it, updated as new steps arrive. See :mod:`bbdecoder.serve.server`."""

from bbdecoder.serve.server import Dashboard, ReadOnlyRunReader, discover_runs, make_server, serve, url_of

__all__ = ["Dashboard", "ReadOnlyRunReader", "discover_runs", "make_server", "serve", "url_of"]
