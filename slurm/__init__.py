"""SLURM job scripts for PoseBERT (``*.sbatch`` + ``common.sh``, every site knob in one file) and
their submitter (:mod:`slurm.submit`, ``posebert slurm ...`` from :mod:`slurm.cli`)."""
