"""Shards of multi-view video windows with 3D/2D pose labels: sources, writer, reader.

Import direction: ``data_shards <- pretrain <- finetune``; nothing here imports a model or
``torch.distributed``.
"""

__version__ = "0.1.0"
