"""SLURM job scripts for PoseBERT (``*.sbatch`` + ``common.sh``, every site knob in one file) and
their submitter: :mod:`slurm.resources` (site defaults, #SBATCH lines), :mod:`slurm.jobs`
(rendering the scripts), :mod:`slurm.submit` (sbatch, dependencies, the job record, status);
``posebert slurm ...`` from :mod:`slurm.cli`. The chain's stages become jobs in
:mod:`pipelines.slurm`."""
