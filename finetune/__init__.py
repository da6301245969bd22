"""Evaluation and fine-tuning on a pretrained encoder: retrieval, heads, metrics."""
