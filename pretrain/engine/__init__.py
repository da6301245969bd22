"""The training engine: launcher-aware dist, DeepSpeed config, schedules, checkpoints, loop.

Nothing here knows the model: :func:`pretrain.engine.loop.train` trains any task module whose
``forward(batch, step)`` returns ``(loss, metrics)``. Modules are imported where used, so
``import pretrain.engine.dist`` does not pull DeepSpeed in.
"""
