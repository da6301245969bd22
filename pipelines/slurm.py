"""The chain of :mod:`pipelines.chain` as Slurm jobs: ``posebert slurm pipeline`` and
``posebert slurm submit evaluate|finetune``.

The stages are the ones ``posebert demo`` runs locally; only their grouping into jobs and the
jobs' resources are Slurm's. Each job starts when the one before succeeded
(``--dependency=afterok``):

    job        stages                         script (slurm/)
    pretrain   pretrain                       pretrain.sbatch: every rank, preemptible, requeues
    evaluate   export, retrieval              stages.sbatch: one node; retrieval on every rank
    finetune   pose, future                   stages.sbatch: one process (at most one GPU)

Scripts and logs go to OUT/slurm, submissions to OUT/slurm_jobs.json (:mod:`slurm.submit`).
"""

from __future__ import annotations

import dataclasses

from pipelines import chain
from pipelines.chain import Chain
from slurm import resources as rs
from slurm.jobs import Job, absolute, preemptible_job, stages_job
from slurm.resources import Request, Resources
from slurm.submit import Submitted, submit_chain

GROUPS = {
    "pretrain": (chain.pretrain,),
    "evaluate": (chain.export, chain.retrieval),
    "finetune": (chain.pose, chain.future),
}
"""The chain's stages, job by job, in the order the jobs run."""


def _absolute(c: Chain) -> Chain:
    """The chain with absolute paths (the job runs elsewhere, from a copy of its script)."""
    paths = {f: absolute(getattr(c, f)) for f in ("shards", "out", "run_dir", "encoder_dir")
             if getattr(c, f) is not None}  # fmt: skip
    return dataclasses.replace(c, **paths)


def job(kind: str, resources: Resources, c: Chain) -> Job:
    """The job ``kind`` of :data:`GROUPS` for the chain ``c``; script and log in OUT/slurm."""
    c = _absolute(c)
    stages = [build(c) for build in GROUPS[kind]]
    record_dir = c.out / "slurm"
    if kind == "pretrain":
        if c.nproc != 1:
            raise ValueError("under Slurm srun starts one process per rank: nproc must be 1")
        (stage,) = stages
        return preemptible_job(resources, stage.name, stage.args, record_dir)
    if kind == "finetune" and (resources.nodes != 1 or resources.tasks_per_node != 1):
        raise ValueError("fine-tuning runs one process: --nodes 1, one task (at most 1 GPU)")
    return stages_job(kind, resources, stages, record_dir)


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """The chain and the resources of its three jobs."""

    chain: Chain
    pretrain: Resources
    evaluate: Resources
    finetune: Resources


def pipeline_jobs(spec: PipelineSpec) -> list[Job]:
    """pretrain -> evaluate -> finetune (:data:`GROUPS`)."""
    return [job(kind, getattr(spec, kind), spec.chain) for kind in GROUPS]


def pipeline_resources(request: Request, eval_time: str | None = None) -> dict[str, Resources]:
    """The three jobs' resources from one request: pretraining as asked; evaluation on one
    node with ``eval_time``; fine-tuning one process. ``--job-name`` names the pretraining job
    only."""
    site = rs.site_settings()
    later = dataclasses.replace(request, time=eval_time, job_name=None)
    return {
        "pretrain": rs.resolve(request, "pretrain", site),
        "evaluate": rs.resolve(later, "evaluate", site, nodes=1),
        "finetune": rs.resolve(later, "finetune", site, nodes=1).one_task(),
    }


def submit_pipeline(
    c: Chain,
    request: Request,
    eval_time: str | None = None,
    after: str | None = None,
    dry_run: bool = False,
) -> tuple[list[Submitted], list[Job]]:
    """Submit the three jobs of ``c`` (the first after job ``after``); the submissions and
    the jobs."""
    jobs = pipeline_jobs(PipelineSpec(c, **pipeline_resources(request, eval_time)))
    return submit_chain(jobs, absolute(c.out), after, dry_run), jobs


def submit_group(
    kind: str, c: Chain, request: Request, after: str | None = None, dry_run: bool = False
) -> tuple[list[Submitted], list[Job]]:
    """Submit one job of :data:`GROUPS` (``submit evaluate`` or ``submit finetune``)."""
    res = rs.resolve(request, kind)
    jobs = [job(kind, res.one_task() if kind == "finetune" else res, c)]
    return submit_chain(jobs, absolute(c.out), after, dry_run), jobs
