"""Command line: `python -m stablesr_min convert IN.ckpt OUT.safetensors`.

Every user error ends in one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from .weights import WeightsError, convert_ckpt, guess_kind


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def cmd_convert(args) -> None:
    tensors = convert_ckpt(args.input, args.output)
    print(f"wrote {args.output}: {len(tensors)} tensors ({guess_kind(tensors)} checkpoint)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stablesr_min", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert an official .ckpt to .safetensors, without running its code")
    convert.add_argument("input", help="the official .ckpt file")
    convert.add_argument("output", help="the .safetensors file to write")
    convert.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
