"""Evaluation and fine-tuning on a pretrained encoder: retrieval, heads, metrics."""


def load_videopose3d(path, key: str = "model_pos", causal: bool = False):
    """VideoPose3D's published checkpoint as a model in eval mode (see
    :func:`finetune.heads.lift.videopose3d.load_videopose3d`); imported lazily, so
    ``import finetune`` stays light."""
    from finetune.heads.lift.videopose3d import load_videopose3d as load

    return load(path, key, causal)
