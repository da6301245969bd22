"""Per-frame embeddings of a whole split, with the poses and labels retrieval needs.

Every frame of every view of every sample of a split becomes one row (N = samples x V x T):
an embedding (N, D) float32 from a frozen encoder (contextualised over its window), the
frame's 3D pose root-relative in the coordinates of that view's camera (N, J, 3) mm (what one
image determines), and its labels (key, clip, action, view, camera, frame).

Embedders are callables ``(frames (B, V, T, 3, H, W) uint8, masks (B, V, T, H, W) | None) ->
(B, V, T, D)`` with a ``fingerprint`` naming them for the cache: :class:`EncoderEmbedder` (a
PoseBERT, pretrained or random-init) and :class:`RawPixels` (the downsampled-pixels reference
row that belongs beside every learned encoder).

A split's rows are cached, verified and shared by several ranks in
:mod:`finetune.evaluation.cache`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_shards.manifest import MANIFEST_NAME, sha256_file
from data_shards.read import ReaderConfig, ShardReader
from data_shards.skeleton import root_relative
from finetune.evaluation.store import open_verified, save_verified

LABELS = ("keys", "clips", "actions", "cameras")  # string columns of Embeddings
INDICES = ("views", "frames")  # integer columns of Embeddings

# ------------------------------------------------------------------------------- embeddings


@dataclasses.dataclass
class Embeddings:
    """Per-frame rows of one split (N rows, ordered sample, view, frame)."""

    vectors: np.ndarray
    """(N, D) float32 embeddings."""
    pose3d: np.ndarray
    """(N, J, 3) float32, mm, root-relative, in the camera coordinates of the row's view."""
    keys: np.ndarray
    """(N,) sample key (str)."""
    clips: np.ndarray
    """(N,) clip (sequence) id (str)."""
    actions: np.ndarray
    """(N,) action label (str)."""
    cameras: np.ndarray
    """(N,) camera name of the view (str)."""
    views: np.ndarray
    """(N,) view index within the sample (int)."""
    frames: np.ndarray
    """(N,) frame index within the clip (int)."""

    def __len__(self) -> int:
        return len(self.vectors)

    def subset(self, rows: np.ndarray) -> Embeddings:
        """Rows selected by a boolean mask or an index array."""
        return Embeddings(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def columns(self) -> dict[str, np.ndarray]:
        """Field name -> array (no copies)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_bytes(self) -> bytes:
        """An .npz (no pickle: strings are fixed-width unicode arrays)."""
        buf = io.BytesIO()
        np.savez(buf, **self.columns())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Embeddings:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})

    def save(self, path: str | os.PathLike, key: str | None = None) -> Path:
        """Verified file (:func:`finetune.evaluation.store.save_verified`), holding ``key``."""
        return save_verified(path, self.to_bytes(), key)

    @classmethod
    def load(cls, path: str | os.PathLike, key: str | None = None) -> Embeddings:
        """Checksum verified before a byte is parsed; with ``key``, the file must hold it (a
        cache entry moved or swapped from another one is refused)."""
        return cls.from_bytes(open_verified(path, key))


class FrameEmbedder(Protocol):
    fingerprint: str

    def __call__(self, frames: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor: ...


class EncoderEmbedder:
    """A frozen PoseBERT (eval, no grad): ``model.embed`` contextualised over the window."""

    def __init__(self, model: torch.nn.Module, fingerprint: str | None = None,
                 device: str | torch.device = "cpu", transforms: tuple = ()):  # fmt: skip
        self.transforms = tuple(transforms)  # frames as the encoder saw them in training
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.fingerprint = fingerprint or module_fingerprint(model, repr(self.transforms))

    @classmethod
    def from_dir(cls, path: str | os.PathLike,
                 device: str | torch.device = "cpu") -> EncoderEmbedder:  # fmt: skip
        """An exported encoder directory; fingerprint = hash of its weights and config files."""
        from data_shards.transforms import Resize
        from pretrain.export import load_encoder, read_encoder_config

        model = load_encoder(path)  # first: it names a directory that is not an encoder
        _, size = read_encoder_config(path)  # checked: 1..MAX_IMAGE_SIZE or None
        transforms = (Resize(size),) if size else ()
        return cls(model, encoder_dir_fingerprint(path), device, transforms)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        masks = None if masks is None else masks.to(self.device)
        return self.model.embed(frames.to(self.device), masks).float().cpu()  # (B, V, T, D)


def random_init_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same architecture at a seeded random initialisation (the random-init reference)."""
    torch.manual_seed(seed)
    return type(model)(model.cfg).eval()


@dataclasses.dataclass
class RawPixels:
    """Reference row: frames area-downsampled to ``size`` x ``size``, flattened, centred."""

    size: int = 16

    @property
    def fingerprint(self) -> str:
        return f"raw_pixels-{self.size}-v1"

    def __call__(self, frames: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        B, V, T, C, H, W = frames.shape
        x = frames.reshape(B * V * T, C, H, W).float() / 255.0
        x = F.adaptive_avg_pool2d(x, self.size)  # (B*V*T, C, s, s)
        x = x.flatten(1)
        x = x - x.mean(dim=1, keepdim=True)  # brightness-invariant, as a fair baseline
        return x.view(B, V, T, -1)  # (B, V, T, D)


def module_fingerprint(model: torch.nn.Module, extra: str = "") -> str:
    """sha256 of a module's state (names, shapes, values), its ``cfg`` when it has one (two
    encoders with the same weights differ when, say, one masks the background) and ``extra``
    (the input transforms): a random-init encoder is cached too."""
    h = hashlib.sha256()
    h.update(repr(getattr(model, "cfg", None)).encode())
    h.update(extra.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def encoder_dir_fingerprint(path: str | os.PathLike) -> str:
    from pretrain.export import CONFIG, WEIGHTS

    path = Path(path)
    parts = [sha256_file(path / name) for name in (WEIGHTS, CONFIG)]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()


def split_fingerprint(split_dir: str | os.PathLike) -> str:
    """sha256 of the split's manifest (it holds every shard's sha256)."""
    return sha256_file(Path(split_dir) / MANIFEST_NAME)


def as_embedder(encoder: torch.nn.Module | FrameEmbedder) -> FrameEmbedder:
    if isinstance(encoder, torch.nn.Module):
        return EncoderEmbedder(encoder)
    return encoder


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (one GPU per local rank), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from pretrain.engine.dist import DistEnv

    return torch.device("cuda", DistEnv.from_environ().local_rank)


def _ranks(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """(rank, world size, whether torch.distributed connects exactly these ranks). None, None:
    the initialised process group's, else rank 0 of 1."""
    from pretrain.engine import dist

    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither (got {rank}, {world_size})")
    group = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else None
    if rank is None or world_size is None:
        rank, world_size = group or (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    if group and group[1] == world_size and group[0] != rank:
        raise ValueError(f"rank={rank} but torch.distributed says rank {group[0]}")
    return rank, world_size, group == (rank, world_size) and world_size > 1


def embed_split_part(
    encoder: torch.nn.Module | FrameEmbedder,
    split_dir: str | os.PathLike,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    normalize: bool = True,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[Embeddings, np.ndarray]:
    """Rank ``rank``'s share of the split (a contiguous range of the manifest's samples, no
    shuffle, no drop): its rows ordered sample, view, frame, and the samples' positions in the
    manifest (one per sample, ascending). Memory: one batch of frames at a time (plus the
    loader's prefetch); only the rows (vectors, poses, labels) accumulate."""
    embedder = as_embedder(encoder)
    config = ReaderConfig(str(split_dir), batch_size=batch_size, shuffle=False,
                          drop_last=False, num_workers=num_workers,
                          transforms=getattr(embedder, "transforms", ()))  # fmt: skip
    reader = ShardReader(config, rank=rank, world_size=world_size)
    if reader.layout.samples == 0:
        raise ValueError(f"{split_dir}: the split is empty")
    lo, hi = reader.dataset.plan.rank_range()
    parts: list[dict[str, np.ndarray]] = []
    seen: set[int] = set()
    where = f" [rank {rank}/{world_size}]" if world_size > 1 else ""
    bar = tqdm(total=hi - lo, desc=f"embed {Path(split_dir).name}{where}", unit="sample",
               disable=not progress or rank != 0)  # fmt: skip
    for batch in reader:
        if "pose3d" not in batch or "Rt" not in batch:
            raise ValueError(f"{split_dir}: samples lack pose3d or cameras (Rt)")
        index = batch["index"].tolist()
        keep = [b for b, i in enumerate(index) if i not in seen]  # padded repeats
        seen.update(index)
        if not keep:
            continue
        vectors = embedder(batch["frames"], batch.get("masks"))[keep].numpy()  # (B, V, T, D)
        finite = np.isfinite(vectors).reshape(len(keep), -1).all(axis=1)
        if not finite.all():  # a search or a probe on them would fail obscurely
            key = batch["keys"][keep[int(np.flatnonzero(~finite)[0])]]
            raise ValueError(f"{split_dir}: the embedder {embedder.fingerprint[:16]} gave NaN or "
                             f"infinite embeddings for sample {key}")  # fmt: skip
        parts.append(_batch_rows(batch, keep, vectors.astype(np.float32, copy=False)))
        bar.update(len(keep))
    bar.close()
    if not parts:
        return _empty_rows(reader.layout), np.zeros(0, dtype=np.int64)
    rows = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    del parts
    samples = rows.pop("samples")
    order = np.argsort(samples, kind="stable")  # worker round robin -> manifest order
    if (order != np.arange(len(order))).any():
        per = len(rows["vectors"]) // len(samples)  # V * T rows per sample
        take = (order[:, None] * per + np.arange(per)).ravel()
        rows = {name: v[take] for name, v in rows.items()}
    if normalize:  # per row: the same in a part as in the whole split
        vectors = rows["vectors"]
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    rows["vectors"] = np.ascontiguousarray(rows["vectors"])
    return Embeddings(**rows), samples[order]


def merge_parts(parts: list[tuple[Embeddings, np.ndarray]]) -> Embeddings:
    """Rank parts -> the whole split's rows, ordered by the samples' manifest positions (not by
    arrival); a sample in several parts is kept once. Equal, row for row, to one process."""
    parts = [(emb, samples) for emb, samples in parts if len(samples)]
    if not parts:
        raise ValueError("no sample of the split could be read")
    samples = np.concatenate([s for _, s in parts])
    rows = sum(len(emb) for emb, _ in parts)
    per = rows // len(samples)
    if per * len(samples) != rows:
        raise ValueError(f"{rows} rows are not whole samples of the same size ({len(samples)})")
    _, first = np.unique(samples, return_index=True)  # ascending positions, first occurrence
    take = (first[:, None] * per + np.arange(per)).ravel()
    if len(parts) == 1 and len(take) == rows and (take == np.arange(rows)).all():
        return parts[0][0]
    return Embeddings(**{f.name: np.concatenate([getattr(e, f.name) for e, _ in parts])[take]
                         for f in dataclasses.fields(Embeddings)})  # fmt: skip


def embed_split(
    encoder: torch.nn.Module | FrameEmbedder,
    split_dir: str | os.PathLike,
    batch_size: int = 8,
    normalize: bool = True,
    num_workers: int = 0,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> Embeddings:
    """Every frame of ``split_dir`` embedded once, rows ordered sample (manifest order), view,
    frame.

    Under torch.distributed (initialised; or ``rank``/``world_size`` matching it) each rank
    embeds its share (:func:`embed_split_part`) and the parts are all-gathered: every rank
    returns the same rows as one process would. Without a process group, several ranks need
    a shared folder to meet in: use :func:`embed_split_cached`.
    """
    rank, world_size, grouped = _ranks(rank, world_size)
    if world_size > 1 and not grouped:
        raise ValueError(
            f"rank {rank} of {world_size} without torch.distributed: embed_split cannot gather "
            "the parts; use embed_split_cached (it meets in the cache folder)"
        )
    part = embed_split_part(encoder, split_dir, rank, world_size, batch_size, normalize,
                            num_workers, progress)  # fmt: skip
    if world_size == 1:
        return merge_parts([part])
    from pretrain.engine import dist

    return merge_parts(dist.all_gather_object(part))


def _batch_rows(batch: dict, keep: list[int], vectors: np.ndarray) -> dict[str, np.ndarray]:
    """Flatten (B, V, T) into rows: vectors, camera-frame root-relative poses, labels, and the
    position of each kept sample (one per sample)."""
    B, V, T, D = vectors.shape
    world = root_relative(batch["pose3d"][keep].double().numpy())  # (B, T, J, 3)
    R = batch["Rt"][keep, :, :, :3].double().numpy()  # (B, V, 3, 3)
    # X_cam = R X_world + t; root-relative, t cancels: rotate only
    cam = np.einsum("bvij,btkj->bvtki", R, world)  # (B, V, T, J, 3)
    metas = [batch["meta"][b] for b in keep]

    def per_row(values: list, axes: str) -> np.ndarray:  # (B,), (B, V) or (B, T) -> (B*V*T,)
        a = np.asarray(values)
        a = a[:, None, None] if axes == "b" else a[:, :, None] if axes == "bv" else a[:, None]
        return np.broadcast_to(a, (B, V, T)).ravel()

    return dict(
        vectors=vectors.reshape(B * V * T, D),
        pose3d=cam.reshape(B * V * T, *cam.shape[-2:]).astype(np.float32),
        keys=per_row([batch["keys"][b] for b in keep], "b").astype(str),
        clips=per_row([m.clip for m in metas], "b").astype(str),
        actions=per_row([m.action for m in metas], "b").astype(str),
        cameras=per_row([[m.views[v].camera for v in range(V)] for m in metas], "bv").astype(str),
        views=per_row([list(range(V)) for _ in metas], "bv").astype(np.int64),
        frames=per_row([list(m.frames) for m in metas], "bt").astype(np.int64),
        samples=batch["index"][keep].numpy().astype(np.int64),
    )


def _empty_rows(layout) -> Embeddings:
    """No rows (a rank whose samples were all unreadable)."""
    from data_shards.skeleton import NUM_JOINTS

    text, ints = np.zeros(0, dtype=str), np.zeros(0, np.int64)
    return Embeddings(np.zeros((0, 0), np.float32), np.zeros((0, NUM_JOINTS, 3), np.float32),
                      text, text, text, text, ints, ints)  # fmt: skip
