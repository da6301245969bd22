"""Embedding and retrieval on CUDA: an exported encoder embeds a split on the GPU as on the CPU,
and ``posebert evaluate retrieval``'s code runs end to end with its default device (the local
GPU). The exact torch search on CUDA and FAISS on the GPU are checked in
tests/finetune/evaluation/test_retrieval_cap.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gpu_shards import NEEDS_CUDA, write_splits

from finetune.evaluation.embed import EncoderEmbedder, embed_split

pytestmark = NEEDS_CUDA


@pytest.fixture(scope="module")
def encoder_and_shards(tmp_path_factory):
    """A random-init debug_cpu encoder exported at 32 px, and 40 px splits."""
    from pretrain.export import save_encoder
    from pretrain.model import PoseBERT
    from pretrain.recipes import debug_cpu

    root = tmp_path_factory.mktemp("gpu_eval")
    cfg = debug_cpu().model
    torch.manual_seed(0)
    save_encoder(PoseBERT(cfg).state_dict(), cfg, root / "encoder", 32)
    return root / "encoder", write_splits(root / "shards")


def test_an_encoder_embeds_a_split_on_cuda_as_on_the_cpu(encoder_and_shards):
    encoder, shards = encoder_and_shards
    cpu = embed_split(EncoderEmbedder.from_dir(encoder, "cpu"), shards / "val", progress=False)
    on = EncoderEmbedder.from_dir(encoder, "cuda")
    assert next(on.model.parameters()).is_cuda
    gpu = embed_split(on, shards / "val", progress=False)
    assert list(gpu.keys) == list(cpu.keys) and gpu.vectors.shape == cpu.vectors.shape
    cosine = (gpu.vectors.astype(np.float64) * cpu.vectors).sum(1)  # both L2-normalised
    assert cosine.min() > 0.999, cosine.min()  # TF32 convolutions on the GPU


def test_retrieval_runs_end_to_end_on_the_default_cuda_device(encoder_and_shards, tmp_path,
                                                              monkeypatch):  # fmt: skip
    pytest.importorskip("faiss")
    import finetune.evaluation.evaluate as evaluate
    from finetune.evaluation.retrieval import RetrievalConfig

    encoder, shards = encoder_and_shards
    assert evaluate.default_device().type == "cuda"
    config = RetrievalConfig(k=3, ks=(1, 3), gpu=False)
    result = evaluate.run_retrieval(encoder, shards, tmp_path / "gpu", config, progress=False)
    rows = result["rows"]
    assert {"model", "random-init", "oracle", "chance"} <= set(rows)
    assert all(math.isfinite(rows[r]["mpjpe"]["top1"]) for r in ("model", "random-init"))
    monkeypatch.setattr(evaluate, "default_device", lambda: torch.device("cpu"))  # the same
    cpu = evaluate.run_retrieval(encoder, shards, tmp_path / "cpu", config, progress=False)
    assert cpu["rows"]["oracle"] == rows["oracle"]
    assert math.isclose(cpu["rows"]["model"]["mpjpe"]["top1"], rows["model"]["mpjpe"]["top1"],
                        rel_tol=0.1)  # near ties may swap between TF32 and float32  # fmt: skip
