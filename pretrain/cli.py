"""`posebert pretrain` and `posebert export`."""

from __future__ import annotations

import argparse
import sys


def register(stages: argparse._SubParsersAction) -> None:
    p = stages.add_parser("pretrain", help="pretrain PoseBERT under DeepSpeed (resumes in OUT)")
    p.add_argument("--recipe", default="debug_cpu", help="debug_cpu, demo_cpu, base, cluster_...")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. model.encoder.depth=4")  # fmt: skip
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="start N local processes (not when run by torchrun or srun)")  # fmt: skip
    p.add_argument("--levers", default=None, metavar="L,L,...|none",
                   help="levers against appearance shortcuts: every one off, then these on "
                   "(background-mask, augment, appearance-swap, span-mask; none: all off)")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.set_defaults(handler=cmd_pretrain)

    p = stages.add_parser("export", help="write a run's encoder as safetensors + JSON config")
    p.add_argument("--run", required=True, help="pretraining run directory")
    p.add_argument("--out", required=True, help="output directory for the encoder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(handler=cmd_export)


def resolve_config(recipe: str, overrides: list[str], levers: str | None = None):
    """The recipe, its ``--levers`` and the ``--set`` overrides (``--set help`` lists every
    field and exits)."""
    from data_shards.configtools import resolve
    from pretrain.recipes import get_recipe, with_levers

    cfg = get_recipe(recipe)
    if levers is not None:
        names = [] if levers.strip() == "none" else [n.strip() for n in levers.split(",")]
        cfg = with_levers(cfg, [n for n in names if n])
    return resolve(cfg, overrides, f"pretrain --recipe {recipe}")


def cmd_pretrain(args: argparse.Namespace) -> int:
    # config errors before any process starts
    cfg = resolve_config(args.recipe, args.overrides, args.levers)
    if args.print_config:
        print(cfg.to_json())
        return 0
    cfg.data.check_device()  # before any process starts
    from pretrain.engine.launch import relaunch

    code = relaunch(args.nproc_per_node, args.argv)
    if code is not None:
        return code
    from pretrain.run import run_pretrain

    return run_pretrain(cfg, args.out)


def cmd_export(args: argparse.Namespace) -> int:
    from pretrain.engine.checkpoint import CheckpointError
    from pretrain.export import export_encoder

    try:
        path = export_encoder(args.run, args.out, step=args.step)
    except CheckpointError as e:  # no valid checkpoint, or one that will not load: one line
        print(f"posebert export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
