"""The `dspark-trt` command line: one subcommand per job of the design.

Each built subcommand lives in `dspark_trt/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`. Subcommands not built yet are listed with the issue that builds them and exit
non-zero with a clear message instead of producing fake output.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dspark_trt import __version__
from dspark_trt.errors import DSparkError, NotBuiltError

# name -> (help text, module under dspark_trt.commands or None, issue that builds it)
SUBCOMMANDS: dict[str, tuple[str, str | None, int]] = {
    "generate": ("generate text with the target, with or without DSpark speculation", "generate", 3),
    "build-engines": ("export target and drafter to ONNX and compile engines", "build_engines", 7),
    "package": ("turn built engines into a Triton model repository", "package", 8),
    "serve": ("start tritonserver on a packaged model repository", "serve", 8),
    "eval": ("measure acceptance and confidence calibration of a drafter", "eval", 6),
    "gen-data": ("regenerate the drafter's training data with the target on the fast engines", "gen_data", 17),
    "train-draft": ("train a DSpark drafter for a target by self-distillation", "train_draft", 6),
    "calibrate": ("fit Sequential Temperature Scaling of the confidence head", "calibrate", 5),
    "profile": ("measure the runtime's cost table SPS(B) for the scheduler", "profile", 5),
    "bench": ("benchmarks: AR speed, speculative speedup, load sweep", "bench", 3),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspark-trt",
        description="DSpark speculative decoding: build engines, package for Triton, serve, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"dspark-trt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, module_name, issue) in SUBCOMMANDS.items():
        if module_name is None:
            sp = sub.add_parser(name, help=f"{help_text} [not built yet: issue #{issue}]")
            sp.set_defaults(_run=_not_built(name, issue), _built=False)
            continue
        module = importlib.import_module(f"dspark_trt.commands.{module_name}")
        sp = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def _not_built(name: str, issue: int):
    def run(_args: argparse.Namespace) -> int:
        raise NotBuiltError(f"'dspark-trt {name}' is not built yet; issue #{issue} builds it.")

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "_built", True):  # options of unbuilt commands are not known yet
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except DSparkError as exc:
        print(f"dspark-trt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dspark-trt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
