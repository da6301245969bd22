"""Heads trained on the shards: the 3D pose regression head on a pretrained encoder
(:mod:`.pose`), Pose-GPT future prediction (:mod:`.future`) and the 2D -> 3D lifting methods
(:mod:`.lift`). Each keeps its model and loss; training goes through :mod:`finetune.loop`,
clips come from :mod:`finetune.clips`, scores from :func:`finetune.evaluation.metrics.
score_sequences`."""
