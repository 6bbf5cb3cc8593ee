"""Command line: ``bbdecoder demo | layers``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from bbdecoder.demo.run import run_demo

    result = run_demo(args.out, epochs=args.epochs, n_images=args.images)
    print(f"test accuracy {result.accuracy:.3f}")
    for key, value in result.metrics.items():
        print(f"{key}: {value:.4g}")
    print(f"wrote {len(result.files)} files to {result.out_dir}/ (start with saliency_grid.png)")
    return 0


def _layers(args: argparse.Namespace) -> int:
    import torch

    from bbdecoder.layers import LayerIndex

    try:
        model = torch.load(args.model, weights_only=False, map_location="cpu")
    except FileNotFoundError:
        print(f"error: no such model file: {args.model}", file=sys.stderr)
        return 2
    except Exception as error:  # unreadable pickle, wrong format
        print(f"error: cannot read a model from {args.model}: {error}", file=sys.stderr)
        return 2
    if isinstance(model, dict):
        print(f"error: {args.model} holds a state_dict, not a model; save the whole model", file=sys.stderr)
        return 2
    for row in LayerIndex(model).table():
        print(f"{row['id']:>4}  {row['name']:<40} {row['type']:<20} {row['params']:>10,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bbdecoder", description="Explain and monitor PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train the digits CNN, explain it, write pictures")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--epochs", type=int, default=4)
    demo.add_argument("--images", type=int, default=6, help="test images to explain")
    demo.set_defaults(handler=_demo)
    layers = commands.add_parser("layers", help="print the layer table (IDs, names, types, parameters)")
    layers.add_argument("--model", required=True, help="a model saved with torch.save(model, path)")
    layers.set_defaults(handler=_layers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
