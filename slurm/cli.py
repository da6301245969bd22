"""`posebert slurm submit {pretrain,evaluate,finetune,shards}`, `pipeline` and `status`.

Defaults that depend on the site (partition, account, GPUs per node, CPUs per task, time
limits, the preemption warning) come from ``slurm/common.sh``; the flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path


def register(stages: argparse._SubParsersAction) -> None:
    slurm = stages.add_parser("slurm", help="submit PoseBERT jobs to a SLURM cluster")
    cmds = slurm.add_subparsers(dest="command", required=True, parser_class=type(slurm))

    submit = cmds.add_parser("submit", help="render a job script and submit it with sbatch")
    kinds = submit.add_subparsers(dest="kind", required=True, parser_class=type(slurm))
    p = kinds.add_parser("pretrain", help="multi-node pretraining, one srun task per GPU")
    _add_resources(p)
    _add_pretrain(p)
    p.set_defaults(handler=cmd_submit)
    p = kinds.add_parser("evaluate", help="export a pretraining run, then retrieval evaluation")
    _add_resources(p)
    p.add_argument("--run", required=True, help="pretraining run directory (posebert export)")
    p.add_argument("--shards", required=True, help="shard root with train and val splits")
    p.add_argument("--out", required=True, help="writes OUT/encoder and OUT/retrieval")
    p.set_defaults(handler=cmd_submit)
    p = kinds.add_parser("finetune", help="3D pose head and future prediction (one process)")
    _add_resources(p)
    p.add_argument("--encoder", required=True, help="exported encoder (posebert export)")
    p.add_argument("--shards", required=True, help="shard root with train and eval splits")
    p.add_argument("--out", required=True, help="writes OUT/pose and OUT/future")
    _add_head_sets(p)
    p.set_defaults(handler=cmd_submit)
    p = kinds.add_parser(
        "shards",
        help="a job array building shards, one task per input",
        description="Task i writes OUT/part-i/<split>/; pretrain reads every "
        "OUT/part-*/train with `submit pretrain --shards OUT`. Arguments after "
        "`--` go to `posebert shards video|synth`.",
    )
    _add_resources(p)
    p.add_argument(
        "--inputs",
        action="append",
        default=[],
        metavar="GLOB",
        help="video files, e.g. 'videos/*.mp4' (quoted: expanded here, sorted)",
    )
    p.add_argument(
        "--clips",
        default=None,
        help="embedded motion clips instead (posebert shards synth): A,B,... or all",
    )
    p.add_argument("--out", required=True, help="shard root: OUT/part-<task>/")
    p.add_argument("--per-task", type=int, default=1, help="inputs per array task")
    p.add_argument(
        "extra",
        nargs="*",
        metavar="-- ARGS",
        help="passed to posebert shards video|synth (e.g. -- --size 224 --frames 16)",
    )
    p.set_defaults(handler=cmd_submit)

    p = cmds.add_parser("pipeline", help="pretrain -> evaluate -> finetune with afterok")
    _add_resources(p)
    _add_pretrain(p, pipeline=True)
    p.add_argument(
        "--eval-time", default=None, help="time limit of evaluation and fine-tuning (common.sh)"
    )
    _add_head_sets(p)
    p.set_defaults(handler=cmd_pipeline)

    p = cmds.add_parser("status", help="state of the jobs recorded in RUN/slurm_jobs.json")
    p.add_argument("run", nargs="?", default=".", help="run directory (default: here)")
    p.set_defaults(handler=cmd_status)


def _add_head_sets(p: argparse.ArgumentParser) -> None:
    for head in ("pose", "future"):
        p.add_argument(f"--{head}-set", dest=f"{head}_overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help=f"a field of the {head} head's config (posebert finetune {head} "
                       "--set)")  # fmt: skip


def _add_resources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (defaults: slurm/common.sh)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node, one rank each; 0: a CPU job (POSEBERT_GPUS_PER_NODE)",
    )
    g.add_argument(
        "--tasks-per-node", type=int, default=None, help="CPU jobs only: ranks per node (default 1)"
    )
    g.add_argument("--cpus-per-task", type=int, default=None, help="(POSEBERT_CPUS_PER_TASK)")
    g.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00 (POSEBERT_*TIME)")
    g.add_argument("--partition", default=None, help="(POSEBERT_PARTITION)")
    g.add_argument("--account", default=None, help="(POSEBERT_ACCOUNT)")
    g.add_argument("--job-name", default=None, help="(posebert-KIND)")
    g.add_argument(
        "--after",
        default=None,
        metavar="JOBID",
        help="start after this job succeeded (--dependency=afterok:JOBID)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the job script(s) and the sbatch command; write nothing",
    )


def _add_pretrain(p: argparse.ArgumentParser, pipeline: bool = False) -> None:
    p.add_argument("--recipe", required=True, help="pretraining recipe (debug_cpu, ...)")
    p.add_argument(
        "--out",
        required=True,
        help="run directory"
        + (": RUN/pretrain, RUN/encoder, RUN/retrieval, RUN/pose, RUN/future" if pipeline else ""),
    )
    p.add_argument(
        "--shards",
        required=pipeline,
        default=None,
        help="shard root: ROOT/train or ROOT/part-*/train sets data.train"
        + (
            "; evaluation and fine-tuning read ROOT's train and val"
            if pipeline
            else " (default: the recipe's)"
        ),
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for posebert pretrain",
    )
    p.add_argument(
        "--signal-s",
        type=int,
        default=None,
        help="SIGUSR1 this many seconds before the limit (POSEBERT_SIGNAL_S)",
    )


def _int(site: dict[str, str], key: str) -> int:
    try:
        return int(site[key])
    except (KeyError, ValueError):
        raise ValueError(f"slurm/common.sh: {key}={site.get(key)!r} is not a number") from None


def _resources(args: argparse.Namespace, site: dict[str, str], kind: str, **fixed):
    from slurm.submit import Resources

    gpus = (
        args.gpus_per_node
        if args.gpus_per_node is not None
        else _int(site, "POSEBERT_GPUS_PER_NODE")
    )
    tasks = args.tasks_per_node
    if gpus and tasks is not None and tasks != gpus:
        raise ValueError(
            "--tasks-per-node is for CPU jobs (--gpus-per-node 0): with GPUs "
            "there is one task per GPU"
        )
    time_key = {"pretrain": "POSEBERT_TIME", "shards": "POSEBERT_SHARDS_TIME"}.get(
        kind, "POSEBERT_EVAL_TIME"
    )
    values = dict(
        nodes=args.nodes,
        gpus_per_node=gpus,
        tasks_per_node=gpus or (tasks if tasks is not None else 1),
        cpus_per_task=args.cpus_per_task or _int(site, "POSEBERT_CPUS_PER_TASK"),
        time=args.time or site.get(time_key) or "01:00:00",
        partition=args.partition if args.partition is not None else site["POSEBERT_PARTITION"],
        account=args.account if args.account is not None else site["POSEBERT_ACCOUNT"],
        qos=site.get("POSEBERT_QOS", ""),
        job_name=args.job_name or f"posebert-{kind}",
        extra=tuple(shlex.split(site.get("POSEBERT_SBATCH_EXTRA", ""))),
    )
    if kind == "pretrain":
        signal_s = getattr(args, "signal_s", None)
        values["signal_s"] = signal_s if signal_s is not None else _int(site, "POSEBERT_SIGNAL_S")
    values.update(fixed)
    return Resources(**values)


def cmd_submit(args: argparse.Namespace) -> int:
    from slurm import submit as sm

    site = sm.site_settings()
    res = _resources(args, site, args.kind)
    if args.kind == "pretrain":
        job = sm.pretrain_job(
            res,
            args.recipe,
            Path(args.out),
            Path(args.shards) if args.shards else None,
            args.overrides,
        )
    elif args.kind == "evaluate":
        job = sm.evaluate_job(res, Path(args.run), Path(args.shards), Path(args.out))
    elif args.kind == "finetune":
        res = dataclasses.replace(res, gpus_per_node=min(res.gpus_per_node, 1), tasks_per_node=1)
        job = sm.finetune_job(res, Path(args.encoder), Path(args.shards), Path(args.out),
                              pose_overrides=args.pose_overrides,
                              future_overrides=args.future_overrides)  # fmt: skip
    else:
        clips = _clips(args.clips)
        inputs = sm.expand_inputs(args.inputs) if args.inputs else []
        res = dataclasses.replace(res, nodes=1, tasks_per_node=1, gpus_per_node=0)
        job = sm.shards_job(
            res,
            Path(args.out),
            inputs,
            clips,
            args.per_task,
            args.extra,
            _int(site, "POSEBERT_ARRAY_PARALLEL"),
        )
    done = sm.submit_chain([job], sm._abs(args.out), args.after, args.dry_run)
    _print(done, [job], args.dry_run)
    return 0


def _clips(text: str | None) -> list[str]:
    if text is None:
        return []
    if text.strip() == "all":
        from data_shards.mocap import CLIP_NAMES

        return list(CLIP_NAMES)
    return [c.strip() for c in text.split(",") if c.strip()]


def cmd_pipeline(args: argparse.Namespace) -> int:
    from slurm import submit as sm

    site = sm.site_settings()
    pretrain = _resources(args, site, "pretrain")
    eval_args = argparse.Namespace(**{**vars(args), "time": args.eval_time, "job_name": None})
    evaluate = _resources(eval_args, site, "evaluate", nodes=1)
    gpus = 1 if evaluate.gpus_per_node else 0
    finetune = _resources(
        eval_args, site, "finetune", nodes=1, gpus_per_node=gpus, tasks_per_node=1
    )
    spec = sm.PipelineSpec(
        pretrain,
        evaluate,
        finetune,
        args.recipe,
        Path(args.shards),
        Path(args.out),
        tuple(args.overrides),
        tuple(args.pose_overrides),
        tuple(args.future_overrides),
    )
    jobs = sm.pipeline_jobs(spec)
    done = sm.submit_chain(jobs, sm._abs(args.out), args.after, args.dry_run)
    _print(done, jobs, args.dry_run)
    return 0


def _print(done: list, jobs: list, dry_run: bool) -> None:
    for d, job in zip(done, jobs, strict=True):
        if dry_run:
            print(f"# ---- {d.script}")
            print(job.render())
            dep = f" --dependency={d.dependency} --kill-on-invalid-dep=yes" if d.dependency else ""
            print(f"# sbatch{dep} {d.script}\n")
        else:
            after = f" after {d.dependency}" if d.dependency else ""
            print(f"{d.kind}: job {d.job_id}{after}  (script {d.script}, log {d.log})")


def cmd_status(args: argparse.Namespace) -> int:
    from slurm import submit as sm

    rows = sm.status_rows(Path(args.run))
    if not rows:
        print(f"{Path(args.run) / sm.JOBS_FILE}: no jobs recorded")
        return 0
    print(sm.format_table(rows, ("kind", "job", "state", "exit", "restarts", "where")))
    return 0
