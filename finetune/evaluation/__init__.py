"""Evaluation of a frozen encoder: metrics (the Human3.6M protocols and the one scorer),
per-frame embeddings with a verified cache, FAISS retrieval with reference rows, the linear
probe and the retrieval gallery."""
