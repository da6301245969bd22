"""Self-supervised pretraining: model, objectives and the DeepSpeed engine."""
