"""`posebert evaluate retrieval` and `posebert finetune pose|future|lift`."""

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
    p.add_argument("--queries", default="val",
                   help="split whose frames are the queries: its clips are the held-out motions "
                   "(choose them with shards synth --val-clips/--test-clips)")  # fmt: skip
    p.add_argument("--cache", default=None,
                   help="embedding cache folder (default OUT/cache); runs with other --queries "
                   "can share it")  # fmt: skip
    p.add_argument("--k", type=int, default=None, help="neighbours retrieved per query (5)")
    p.add_argument("--index", choices=("flat", "ivfpq"), default=None, help="FAISS index (flat)")
    p.add_argument("--exclude-same-clip", action="store_const", const=True,
                   help="never match the same clip")  # fmt: skip
    p.add_argument("--cross-view", action="store_const", const=True,
                   help="gallery from other cameras only")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="embed with N local processes (not under torchrun or srun)")  # fmt: skip
    _add_set(p, "retrieval")
    p.set_defaults(handler=cmd_retrieval)

    finetune = stages.add_parser("finetune", help="train and score a head on the shards")
    cmds = finetune.add_subparsers(dest="command", required=True, parser_class=type(finetune))
    p = cmds.add_parser("pose", help="3D pose regression head: linear probe and full fine-tune")
    p.add_argument("--encoder", required=True, help="exported encoder (posebert export)")
    p.add_argument("--shards", required=True, help="shard root with train and eval splits")
    p.add_argument("--out", required=True, help="output directory (pose.json, .md, .png)")
    p.add_argument("--labels", default=None, metavar="F,F,...",
                   help="label fractions of the train windows (default 0.01,0.1,1)")  # fmt: skip
    p.add_argument("--modes", default=None, help="probe, full or probe,full (default both)")
    p.add_argument("--cache", default=None,
                   help="embedding cache folder (default OUT/cache; retrieval's OUT/cache "
                   "reuses its embeddings)")  # fmt: skip
    p.add_argument("--recipe", default="default", help="default, demo or quick")
    _add_set(p, "pose")
    p.set_defaults(handler=cmd_pose)

    p = cmds.add_parser("future", help="Pose-GPT future 3D pose prediction with baselines")
    p.add_argument("--shards", required=True, help="shard root with train and eval splits")
    p.add_argument("--out", required=True, help="output directory (future.json, .md, .png)")
    p.add_argument("--recipe", default="default", help="default or quick")
    _add_set(p, "future")
    p.set_defaults(handler=cmd_future)

    p = cmds.add_parser("lift", help="2D -> 3D lifting methods: VideoPose3D TCN, VAE-GAN, "
                        "cyclic, self-correcting, HRNet image head")  # fmt: skip
    p.add_argument("--method", required=True,
                   choices=("tcn", "vaegan", "cyclic", "selfcorrect", "hrnet"))  # fmt: skip
    p.add_argument("--shards", required=True, help="shard root with train and held-out splits")
    p.add_argument("--out", required=True, help="output directory (lift.json, .md, .png)")
    p.add_argument("--rows", default=None, metavar="R,R,...",
                   help="rows of the method's ablation to run (default all; --rows help lists)")
    p.add_argument("--input", dest="input_2d", choices=("gt", "detected"), default="gt",
                   help="2D input, train and held-out: the shards' projections (gt) or the "
                   "detector's keypoints (detected: the det2d of posebert shards detect, no "
                   "imitation noise on top)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the method's config, e.g. steps=500 "
                   "(--set help lists them)")  # fmt: skip
    p.set_defaults(handler=cmd_lift)


def _add_set(p: argparse.ArgumentParser, head: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a field of the {head} config, e.g. seed=1 "
                   "(--set help lists them)")  # fmt: skip


def cmd_retrieval(args: argparse.Namespace) -> int:
    from data_shards.configtools import from_recipe
    from finetune.evaluation.evaluate import run_retrieval
    from finetune.evaluation.retrieval import RetrievalConfig
    from pretrain.engine.launch import relaunch

    k = {"k": args.k, "ks": tuple(sorted({1, args.k}))} if args.k is not None else {}
    config = from_recipe({"default": RetrievalConfig}, "default", args.overrides,
                         "evaluate retrieval", kind=args.index, cross_view=args.cross_view,
                         exclude_same_clip=args.exclude_same_clip, **k)  # fmt: skip
    code = relaunch(args.nproc_per_node, args.argv)
    if code is not None:
        return code
    result = run_retrieval(args.encoder, args.shards, args.out, config, args.queries,
                           args.batch_size, progress=sys.stderr.isatty(),
                           cache_dir=args.cache)  # fmt: skip
    if result is not None:  # ranks other than 0 embed their share and return None
        print((Path(args.out) / "retrieval.md").read_text())
    return 0


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def _floats(text: str | None) -> tuple[float, ...] | None:
    try:
        return None if text is None else tuple(float(x) for x in _names(text))
    except ValueError:
        raise ValueError(f"--labels: expected comma-separated numbers, got {text!r}") from None


def cmd_pose(args: argparse.Namespace) -> int:
    from data_shards.configtools import from_recipe
    from finetune.heads.pose import RECIPES, run_pose

    config = from_recipe(RECIPES, args.recipe, args.overrides, "finetune pose",
                         modes=_names(args.modes), label_fractions=_floats(args.labels))
    run_pose(args.encoder, args.shards, args.out, config, progress=sys.stderr.isatty(),
             cache_dir=args.cache)  # fmt: skip
    print((Path(args.out) / "pose.md").read_text())
    return 0


def cmd_future(args: argparse.Namespace) -> int:
    from data_shards.configtools import from_recipe
    from finetune.heads.future import RECIPES, run_future

    config = from_recipe(RECIPES, args.recipe, args.overrides, "finetune future")
    run_future(args.shards, args.out, config, progress=sys.stderr.isatty())
    print((Path(args.out) / "future.md").read_text())
    return 0


def cmd_lift(args: argparse.Namespace) -> int:
    from data_shards.configtools import resolve
    from finetune.heads.lift.base import get_method
    from finetune.heads.lift.run import run_lift

    method = get_method(args.method)
    if args.rows == "help" or "help" in args.overrides:
        for row, changes in method.rows.items():
            print(f"row {row!r}: {changes or 'the recipe'}")
        resolve(method.config(), ["help"], f"lift --method {args.method}")
    run_lift(args.method, args.shards, args.out, args.rows, args.overrides,
             progress=sys.stderr.isatty(), input_2d=args.input_2d)  # fmt: skip
    print((Path(args.out) / "lift.md").read_text())
    return 0
