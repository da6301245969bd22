"""Pipelines that chain ``posebert`` commands: the demo, the ablation and the Slurm pipeline.
Each stage is the command a user would type, printed before it runs and skipped when its
output is there."""
