"""`posebert slurm submit {pretrain,evaluate,finetune,shards}`, `pipeline` and `status`:
parsing, then handing off to :mod:`slurm.jobs` and :mod:`slurm.submit`, or, for the commands
that run the stages of ``pipelines/chain.py`` (``submit evaluate|finetune``, ``pipeline``),
to :mod:`pipelines.slurm`.

Defaults that depend on the site (partition, account, GPUs per node, CPUs per task, time
limits, the preemption warning) come from ``slurm/common.sh``; the flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def register(stages: argparse._SubParsersAction) -> None:
    slurm = stages.add_parser("slurm", help="submit PoseBERT jobs to a SLURM cluster")
    cmds = slurm.add_subparsers(dest="command", required=True, parser_class=type(slurm))

    submit = cmds.add_parser("submit", help="render a job script and submit it with sbatch")
    kinds = submit.add_subparsers(dest="kind", required=True, parser_class=type(slurm))
    p = kinds.add_parser("pretrain", help="multi-node pretraining, one srun task per GPU")
    _add_resources(p)
    _add_pretrain(p)
    p.set_defaults(handler=cmd_submit_pretrain)
    p = kinds.add_parser("evaluate", help="export a pretraining run, then retrieval evaluation")
    _add_resources(p)
    p.add_argument("--run", dest="run_dir", type=Path, required=True,
                   help="pretraining run directory (posebert export)")  # fmt: skip
    p.add_argument("--shards", type=Path, required=True, help="shard root with train and val")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/encoder, OUT/retrieval")
    p.set_defaults(handler=cmd_submit_stages)
    p = kinds.add_parser("finetune", help="3D pose head and future prediction (one process)")
    _add_resources(p)
    p.add_argument("--encoder", dest="encoder_dir", type=Path, required=True,
                   help="exported encoder (posebert export)")  # fmt: skip
    p.add_argument("--shards", type=Path, required=True, help="shard root with train and eval")
    p.add_argument("--out", type=Path, required=True,
                   help="writes OUT/pose and OUT/future (embeddings cached in "
                   "OUT/retrieval/cache)")  # fmt: skip
    _add_heads(p)
    p.set_defaults(handler=cmd_submit_stages)
    p = kinds.add_parser(
        "shards",
        help="a job array building shards, one task per input",
        description="Task i writes OUT/part-i/<split>/; pretrain reads every "
        "OUT/part-*/train with `submit pretrain --shards OUT`. Arguments after "
        "`--` go to `posebert shards video|synth`.",
    )
    _add_resources(p)
    p.add_argument("--inputs", action="append", default=[], metavar="GLOB",
                   help="video files, e.g. 'videos/*.mp4' (quoted: expanded here, "
                   "sorted)")  # fmt: skip
    p.add_argument("--clips", default=None,
                   help="embedded motion clips instead (posebert shards synth): A,B,... or "
                   "all")  # fmt: skip
    p.add_argument("--out", required=True, help="shard root: OUT/part-<task>/")
    p.add_argument("--per-task", type=int, default=1, help="inputs per array task")
    p.add_argument("extra", nargs="*", metavar="-- ARGS",
                   help="passed to posebert shards video|synth (e.g. -- --size 224 "
                   "--frames 16)")  # fmt: skip
    p.set_defaults(handler=cmd_submit_shards)

    p = cmds.add_parser("pipeline", help="the stages of pipelines/chain.py as three jobs "
                        "chained with afterok: pretrain, export + retrieval, pose + future "
                        "heads")  # fmt: skip
    _add_resources(p)
    _add_pretrain(p, pipeline=True)
    p.add_argument("--eval-time", default=None,
                   help="time limit of evaluation and fine-tuning (common.sh)")  # fmt: skip
    _add_heads(p)
    p.set_defaults(handler=cmd_pipeline)

    p = cmds.add_parser("status", help="state of the jobs recorded in RUN/slurm_jobs.json")
    p.add_argument("run", nargs="?", default=".", help="run directory (default: here)")
    p.set_defaults(handler=cmd_status)


def _add_heads(p: argparse.ArgumentParser) -> None:
    for head in ("pose", "future"):
        p.add_argument(f"--{head}-recipe", default="default",
                       help=f"posebert finetune {head} --recipe (default: default)")  # fmt: skip
        p.add_argument(f"--{head}-set", dest=f"{head}_sets", action="append", default=[],
                       metavar="KEY=VALUE",
                       help=f"a field of the {head} head's config (posebert finetune {head} "
                       "--set)")  # fmt: skip


def _add_resources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (defaults: slurm/common.sh)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node, one rank each; 0: a CPU job "
                   "(POSEBERT_GPUS_PER_NODE)")  # fmt: skip
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="CPU jobs only: ranks per node (default 1)")  # fmt: skip
    g.add_argument("--cpus-per-task", type=int, default=None, help="(POSEBERT_CPUS_PER_TASK)")
    g.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00 (POSEBERT_*TIME)")
    g.add_argument("--partition", default=None, help="(POSEBERT_PARTITION)")
    g.add_argument("--account", default=None, help="(POSEBERT_ACCOUNT)")
    g.add_argument("--job-name", default=None, help="(posebert-KIND)")
    g.add_argument("--after", default=None, metavar="JOBID",
                   help="start after this job succeeded (--dependency=afterok:JOBID)")  # fmt: skip
    g.add_argument("--dry-run", action="store_true",
                   help="print the job script(s) and the sbatch command; write "
                   "nothing")  # fmt: skip


def _add_pretrain(p: argparse.ArgumentParser, pipeline: bool = False) -> None:
    p.add_argument("--recipe", required=True, help="pretraining recipe (debug_cpu, ...)")
    parts = ": RUN/pretrain, RUN/encoder, RUN/retrieval, RUN/pose, RUN/future"
    p.add_argument("--out", type=Path, required=True,
                   help="run directory" + (parts if pipeline else ""))  # fmt: skip
    if pipeline:
        p.add_argument("--shards", type=Path, required=True,
                       help="shard root with train and val splits: pretraining reads "
                       "ROOT/train, evaluation and fine-tuning ROOT's splits")  # fmt: skip
        p.add_argument("--levers", default=None, metavar="L,L,...|none",
                       help="posebert pretrain --levers (default: the recipe's)")  # fmt: skip
    else:
        p.add_argument("--shards", type=Path, default=None,
                       help="shard root: ROOT/train or ROOT/part-*/train (found when the job "
                       "starts) sets data.train (default: the recipe's)")  # fmt: skip
    p.add_argument("--set", dest="pretrain_sets", action="append", default=[],
                   metavar="KEY=VALUE", help="config override for posebert pretrain")  # fmt: skip
    p.add_argument("--signal-s", type=int, default=None,
                   help="SIGUSR1 this many seconds before the limit "
                   "(POSEBERT_SIGNAL_S)")  # fmt: skip


def _request(args: argparse.Namespace):
    from slurm.resources import Request

    return Request(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(Request)})


def _chain(args: argparse.Namespace):
    """The chain the flags describe: each flag's dest is a field of ``Chain``."""
    from pipelines.chain import Chain

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Chain) if f.name in args}
    return Chain(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def _report(done: list, jobs: list, dry_run: bool) -> int:
    from slurm.submit import describe

    print(describe(done, jobs, dry_run))
    return 0


def cmd_submit_pretrain(args: argparse.Namespace) -> int:
    from slurm import jobs, resources, submit

    res = resources.resolve(_request(args), "pretrain")
    job = jobs.pretrain_job(res, args.recipe, args.out, args.shards, args.pretrain_sets)
    done = submit.submit_chain([job], jobs.absolute(args.out), args.after, args.dry_run)
    return _report(done, [job], args.dry_run)


def cmd_submit_stages(args: argparse.Namespace) -> int:
    from pipelines.slurm import submit_group

    done, jobs = submit_group(args.kind, _chain(args), _request(args), args.after, args.dry_run)
    return _report(done, jobs, args.dry_run)


def cmd_submit_shards(args: argparse.Namespace) -> int:
    from slurm import jobs, resources, submit

    site = resources.site_settings()
    res = resources.resolve(_request(args), "shards", site, nodes=1, tasks_per_node=1,
                            gpus_per_node=0)  # fmt: skip
    job = jobs.shards_job(res, Path(args.out), jobs.expand_inputs(args.inputs),
                          jobs.clip_names(args.clips), args.per_task, args.extra,
                          resources.site_int(site, "POSEBERT_ARRAY_PARALLEL"))  # fmt: skip
    done = submit.submit_chain([job], jobs.absolute(args.out), args.after, args.dry_run)
    return _report(done, [job], args.dry_run)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from pipelines.slurm import submit_pipeline

    done, jobs = submit_pipeline(_chain(args), _request(args), args.eval_time, args.after,
                                 args.dry_run)  # fmt: skip
    return _report(done, jobs, args.dry_run)


def cmd_status(args: argparse.Namespace) -> int:
    from slurm import submit

    rows = submit.status_rows(Path(args.run))
    if not rows:
        print(f"{Path(args.run) / submit.JOBS_FILE}: no jobs recorded")
        return 0
    print(submit.format_table(rows, ("kind", "job", "state", "exit", "restarts", "where")))
    return 0
