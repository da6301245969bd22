"""The training engine: launcher-aware dist, DeepSpeed config, schedules, checkpoints, loop.

Nothing here knows the model: :func:`pretrain.engine.loop.train` trains any task module whose
``forward(batch, step)`` returns ``(loss, metrics)``. Modules are imported where used, so
``import pretrain.engine.dist`` does not pull DeepSpeed in.
"""

import os as _os

if "DS_ACCELERATOR" not in _os.environ:
    # DeepSpeed guesses the accelerator on import and prints a warning to stdout when it falls
    # back to the CPU (which would corrupt `posebert pretrain --print-config > file.json`).
    import torch as _torch

    _os.environ["DS_ACCELERATOR"] = "cuda" if _torch.cuda.is_available() else "cpu"
