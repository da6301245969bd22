"""Per-frame embeddings of a whole split, with the poses and labels retrieval needs.

Every frame of every view of every sample of a split becomes one row (N = samples x V x T):
an embedding (N, D) float32 from a frozen encoder (contextualised over its window), the
frame's 3D pose root-relative in the coordinates of that view's camera (N, J, 3) mm (what one
image determines; GUIDE.md section 6), and its labels (key, clip, action, view, camera, frame).

Embedders are callables ``(frames (B, V, T, 3, H, W) uint8, masks (B, V, T, H, W) | None) ->
(B, V, T, D)`` with a ``fingerprint`` naming them for the cache: :class:`EncoderEmbedder` (a
PoseBERT, pretrained or random-init) and :class:`RawPixels` (the downsampled-pixels reference
row that GUIDE.md section 6 asks for beside every learned encoder).

Caching (:func:`embed_split_cached`): files are keyed by the embedder's fingerprint and the
split manifest's sha256, written atomically with a sha256 file beside them, and verified
before they are read (:func:`save_verified` / :func:`open_verified`; RELIABILITY.md, FAISS).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_shards.manifest import MANIFEST_NAME, atomic_write_bytes, sha256_file
from data_shards.read import ReaderConfig, ShardReader
from data_shards.skeleton import root_relative

LABELS = ("keys", "clips", "actions", "cameras")  # string columns of Embeddings
INDICES = ("views", "frames")  # integer columns of Embeddings


class ChecksumError(RuntimeError):
    """A cached file does not match the sha256 beside it (tampered or corrupted): not read."""


# ---------------------------------------------------------------- verified, atomic cache files


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_verified(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically with ``path.sha256`` beside it.

    Order matters for a run killed at any point: the old checksum is removed first, then the
    data replaced (temp + fsync + rename), then the new checksum written the same way. Every
    crash state is "no checksum" (a cache miss, rebuilt) or a consistent pair; a mismatching
    pair can only come from tampering or corruption, and :func:`open_verified` refuses it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    checksum_path(path).unlink(missing_ok=True)
    atomic_write_bytes(path, data)
    atomic_write_bytes(checksum_path(path), f"{digest}  {path.name}\n".encode())
    return path


def is_complete(path: str | os.PathLike) -> bool:
    """True when both the file and its checksum exist (a finished write, maybe tampered)."""
    path = Path(path)
    return path.is_file() and checksum_path(path).is_file()


def open_verified(path: str | os.PathLike) -> bytes:
    """The bytes of ``path`` after checking them against ``path.sha256``; raises
    :class:`ChecksumError` (nothing parsed) on a mismatch or a missing checksum."""
    path = Path(path)
    sums = checksum_path(path)
    if not sums.is_file():
        raise ChecksumError(f"{path}: no checksum file {sums.name}; refusing to read it")
    expected = sums.read_text().split()[0] if sums.read_text().strip() else ""
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumError(
            f"{path}: sha256 {actual[:16]}... does not match {sums.name} ({expected[:16]}...); "
            "the file was modified or corrupted; delete it (and its .sha256) to rebuild"
        )
    return data


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

    def to_bytes(self) -> bytes:
        """An .npz (no pickle: strings are fixed-width unicode arrays)."""
        buf = io.BytesIO()
        np.savez(buf, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Embeddings:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})

    def save(self, path: str | os.PathLike) -> Path:
        return save_verified(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embeddings:
        """Checksum verified before a byte is parsed."""
        return cls.from_bytes(open_verified(path))


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
        self.fingerprint = fingerprint or module_fingerprint(model)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, device: str = "cpu") -> EncoderEmbedder:
        """An exported encoder directory; fingerprint = hash of its weights and config files."""
        from data_shards.transforms import Resize
        from pretrain.export import CONFIG, load_encoder

        size = json.loads((Path(path) / CONFIG).read_text()).get("input", {}).get("size")
        transforms = (Resize(size),) if size else ()
        return cls(load_encoder(path), encoder_dir_fingerprint(path), device, transforms)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        masks = None if masks is None else masks.to(self.device)
        return self.model.embed(frames.to(self.device), masks).float().cpu()  # (B, V, T, D)


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


def module_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a module's state (names, shapes, values): a random-init encoder is cached too."""
    h = hashlib.sha256()
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


def embed_split(
    encoder: torch.nn.Module | FrameEmbedder,
    split_dir: str | os.PathLike,
    batch_size: int = 8,
    normalize: bool = True,
    num_workers: int = 0,
    progress: bool = True,
) -> Embeddings:
    """Every frame of ``split_dir`` embedded once (rank 0 of 1, no shuffle, no drop)."""
    embedder = as_embedder(encoder)
    config = ReaderConfig(str(split_dir), batch_size=batch_size, shuffle=False,
                          drop_last=False, num_workers=num_workers,
                          transforms=getattr(embedder, "transforms", ()))  # fmt: skip
    reader = ShardReader(config, rank=0, world_size=1)
    if reader.layout.samples == 0:
        raise ValueError(f"{split_dir}: the split is empty")
    rows: dict[str, list] = {name: [] for name in ("vectors", "pose3d", *LABELS, *INDICES)}
    seen: set[str] = set()
    bar = tqdm(total=reader.layout.samples, desc=f"embed {Path(split_dir).name}",
               unit="sample", disable=not progress)  # fmt: skip
    for batch in reader:
        if "pose3d" not in batch or "Rt" not in batch:
            raise ValueError(f"{split_dir}: samples lack pose3d or cameras (Rt)")
        keep = [b for b, key in enumerate(batch["keys"]) if key not in seen]  # padded repeats
        seen.update(batch["keys"])
        if not keep:
            continue
        vectors = embedder(batch["frames"], batch.get("masks"))[keep].numpy()  # (B, V, T, D)
        _append_batch(rows, batch, keep, vectors)
        bar.update(len(keep))
    bar.close()
    vectors = np.concatenate(rows.pop("vectors")).astype(np.float32)
    if normalize:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return Embeddings(
        vectors=np.ascontiguousarray(vectors),
        pose3d=np.concatenate(rows.pop("pose3d")).astype(np.float32),
        **{k: np.asarray(v, dtype=str) for k, v in rows.items() if k in LABELS},
        **{k: np.asarray(v, dtype=np.int64) for k, v in rows.items() if k in INDICES},
    )


def _append_batch(rows: dict[str, list], batch: dict, keep: list[int], vectors: np.ndarray) -> None:
    """Flatten (B, V, T) into rows: vectors, camera-frame root-relative poses, labels."""
    B, V, T, D = vectors.shape
    rows["vectors"].append(vectors.reshape(B * V * T, D))
    world = root_relative(batch["pose3d"][keep].double().numpy())  # (B, T, J, 3)
    R = batch["Rt"][keep, :, :, :3].double().numpy()  # (B, V, 3, 3)
    # X_cam = R X_world + t; root-relative, t cancels: rotate only
    cam = np.einsum("bvij,btkj->bvtki", R, world)  # (B, V, T, J, 3)
    rows["pose3d"].append(cam.reshape(B * V * T, *cam.shape[-2:]))
    for b in keep:
        meta = batch["meta"][b]
        for v in range(V):
            for t in range(T):
                rows["keys"].append(batch["keys"][b])
                rows["clips"].append(meta.clip)
                rows["actions"].append(meta.action)
                rows["cameras"].append(meta.views[v].camera)
                rows["views"].append(v)
                rows["frames"].append(meta.frames[t])


def embed_split_cached(
    encoder: torch.nn.Module | FrameEmbedder,
    split_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    batch_size: int = 8,
    normalize: bool = True,
    **kwargs,
) -> tuple[Embeddings, Path]:
    """:func:`embed_split` through the cache; returns the embeddings and their cache folder.

    The folder is ``cache_dir/<embedder fingerprint[:16]>-<manifest sha256[:16]>``; a complete
    file is verified before it is read (a mismatch raises :class:`ChecksumError`), a missing or
    half-written one (no checksum) is rebuilt.
    """
    embedder = as_embedder(encoder)
    folder = Path(cache_dir) / f"{embedder.fingerprint[:16]}-{split_fingerprint(split_dir)[:16]}"
    path = folder / f"embeddings{'-l2norm' if normalize else ''}.npz"
    if is_complete(path):
        return Embeddings.load(path), folder
    emb = embed_split(embedder, split_dir, batch_size, normalize, **kwargs)
    emb.save(path)
    info = dict(embedder=embedder.fingerprint, split=str(split_dir), rows=len(emb),
                dim=int(emb.vectors.shape[1]), normalize=normalize)  # fmt: skip
    save_verified(folder / "info.json", json.dumps(info, indent=1).encode())
    return emb, folder
