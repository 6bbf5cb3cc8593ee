"""The ``serve`` subcommand (registered by :mod:`bbdecoder.cli` with one call)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``bbdecoder serve RUN_DIR [--port] [--host] [--token]`` on a subparsers object."""
    parser = commands.add_parser(
        "serve",
        help="live dashboard: the report served from a run store while training writes it",
        description="Serve the report of RUN_DIR (a run folder, or a folder of run folders) and update it "
        "as new steps arrive. Prints the URL, with its access token, on the first line.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a folder holding run.sqlite, or a folder of them")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 picks a free one)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--token", help="access token (default: a random one, shown in the URL)")
    parser.add_argument("--interval", type=float, default=1.0, help="page refresh interval in seconds")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from bbdecoder.cli import EXIT_MISSING, EXIT_UNREADABLE, CLIError
    from bbdecoder.serve.server import serve
    from bbdecoder.store.schema import StoreError

    try:
        serve(
            args.run_dir,
            host=args.host,
            port=args.port,
            token=args.token,
            interval_ms=int(args.interval * 1000),
        )
    except FileNotFoundError as err:
        raise CLIError(str(err), EXIT_MISSING) from err
    except StoreError as err:
        raise CLIError(str(err), EXIT_UNREADABLE) from err
    except OSError as err:
        raise CLIError(
            f"cannot listen on {args.host}:{args.port} ({err}); try --port 0", EXIT_UNREADABLE
        ) from err
    return 0
