"""`posebert demo` and `posebert ablation`."""

from __future__ import annotations

import argparse


def register(stages: argparse._SubParsersAction) -> None:
    p = stages.add_parser("demo", help="the whole pipeline on the embedded data, one table")
    p.add_argument("--out", required=True, help="output directory (re-running it continues)")
    p.add_argument("--quick", action="store_true", help="a sliver of the data, a few minutes")
    p.add_argument("--nproc-per-node", type=int, default=2, help="pretraining processes")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p.set_defaults(handler=cmd_demo)

    p = stages.add_parser("ablation", help="which pretraining levers make features carry pose: "
                          "retrieval on two held-out clip sets")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory (re-running it continues)")
    p.add_argument("--variants", default=None, metavar="V,V,...",
                   help="variants or groups: levers (the default: baseline, each lever "
                   "against appearance, all, all+same-window-negatives), comparison (negatives "
                   "uniform / gt_pose / cosine x background mask, and the quantizer), or any "
                   "variant by name")  # fmt: skip
    p.add_argument("--steps", default=None, metavar="N,N,...",
                   help="pretraining budgets: every variant at each (a compute-scaling curve; "
                   "default: the recipe's steps)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a sliver of the data, a few minutes")
    p.add_argument("--nproc-per-node", type=int, default=2, help="pretraining processes")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p.set_defaults(handler=cmd_ablation)


def cmd_demo(args: argparse.Namespace) -> int:
    from data_shards.extras import require
    from pipelines.demo import run_demo

    if not args.dry_run:
        require("render", "video")  # the embedded shards and clip video; the 2D detector
    return run_demo(args.out, quick=args.quick, nproc=args.nproc_per_node, dry_run=args.dry_run)


def cmd_ablation(args: argparse.Namespace) -> int:
    from data_shards.extras import require
    from pipelines.ablation import run_ablation

    if not args.dry_run:
        require("render")  # the embedded shards
    return run_ablation(args.out, args.variants, quick=args.quick, nproc=args.nproc_per_node,
                        dry_run=args.dry_run, steps=args.steps)
