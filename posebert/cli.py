"""`posebert <stage> <command> ...`: parse, then hand off to the stage package.

Each stage package owns its subcommands through a ``register(subparsers)`` function; this
module only assembles them and turns expected failures into one error line.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from data_shards import __version__
from data_shards.extras import MissingExtra

EX_IOERR = 74
"""sysexits' I/O error: a write ran out of space (the pretraining loop's exit code for it too)."""
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are a single line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from data_shards.cli import register as register_shards
    from finetune.cli import register as register_finetune
    from finetune.predict.cli import register as register_predict
    from finetune.report.cli import register as register_report
    from pipelines.cli import register as register_pipelines
    from pretrain.cli import register as register_pretrain
    from slurm.cli import register as register_slurm

    parser = OneLineParser(prog="posebert", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"posebert {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    stages = parser.add_subparsers(dest="stage", required=True, parser_class=OneLineParser)
    register_shards(stages)
    register_pretrain(stages)
    register_finetune(stages)
    register_predict(stages)
    register_pipelines(stages)
    register_report(stages)
    register_slurm(stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["pretrain"] and argv is None:  # before the seconds of imports that follow
        from pretrain.signals import record_early

        record_early()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc-per-node relaunches
    from finetune.report.writer import record_command

    record_command(args.argv)  # each stage's JSON keeps the command that made it
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("posebert: interrupted", file=sys.stderr)
        return 130
    except MissingExtra as e:  # an optional part this interpreter lacks: say how to get it
        command = " ".join(filter(None, (args.stage, getattr(args, "command", None))))
        print(e.line(f"posebert {command}"), file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # bad input: one line, nothing written is lost
        print(f"posebert {args.stage}: error: {e}", file=sys.stderr)
        return EX_IOERR if isinstance(e, OSError) and e.errno in _NO_SPACE else 2


if __name__ == "__main__":
    sys.exit(main())
