"""`posebert evaluate retrieval`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(stages: argparse._SubParsersAction) -> None:
    evaluate = stages.add_parser("evaluate", help="evaluate a pretrained encoder")
    cmds = evaluate.add_subparsers(dest="command", required=True, parser_class=type(evaluate))
    p = cmds.add_parser("retrieval", help="top-k 3D-pose retrieval MPJPE with reference rows")
    p.add_argument("--encoder", required=True, help="exported encoder (posebert export)")
    p.add_argument("--shards", required=True, help="shard root with train and val splits")
    p.add_argument("--out", required=True, help="output directory (retrieval.json, .md, cache)")
    p.add_argument("--queries", default="val", help="split whose frames are the queries")
    p.add_argument("--k", type=int, default=5, help="neighbours retrieved per query")
    p.add_argument("--index", choices=("flat", "ivfpq"), default="flat", help="FAISS index")
    p.add_argument("--exclude-same-clip", action="store_true", help="never match the same clip")
    p.add_argument("--cross-view", action="store_true", help="gallery from other cameras only")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(handler=cmd_retrieval)


def cmd_retrieval(args: argparse.Namespace) -> int:
    from finetune.evaluate import run_retrieval
    from finetune.retrieval import RetrievalConfig

    config = RetrievalConfig(k=args.k, ks=tuple(sorted({1, args.k})), kind=args.index,
                             exclude_same_clip=args.exclude_same_clip,
                             cross_view=args.cross_view)  # fmt: skip
    run_retrieval(args.encoder, args.shards, args.out, config, args.queries, args.batch_size,
                  progress=sys.stderr.isatty())  # fmt: skip
    print((Path(args.out) / "retrieval.md").read_text())
    return 0
