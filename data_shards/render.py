"""Headless, deterministic rendering of the DeepMimic character with pybullet's TinyRenderer.

:class:`BodyRenderer` owns one pybullet client in DIRECT mode (no display, no GPU; the same
scene always gives the same pixels). It loads ``humanoid.urdf`` scaled to metres (x 0.25) times
the body height, thickened per :class:`~data_shards.appearance.Appearance`, sets poses from
:mod:`data_shards.mocap`, and draws a :class:`~data_shards.camera.Camera` exactly: the camera's
K, R, t become OpenGL view and (off-centre) projection matrices, so a person crop is simply a
camera with crop intrinsics rendered straight at the crop size.

pybullet's world here is the project's world in metres (Z up): pybullet positions x 1000 are
world millimetres. One client per process: give each worker its own renderer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_shards import mocap
from data_shards.appearance import LINKS, Appearance, Light, body_urdf, texture_images
from data_shards.camera import Camera
from data_shards.extras import import_extra

NEAR_M, FAR_M = 0.05, 100.0
"""Clipping planes of the projection, metres (cameras are a few metres from the person)."""

# TinyRenderer samples pixel column i at x = i and row r at y = r + 1 of the continuous image
# (measured: a sphere's mask centroid sits (+0.5, -0.5) px off its projection otherwise). Our
# pixels are sampled at their centres (i + 0.5, r + 0.5), so the principal point is shifted.
_SAMPLE_SHIFT = (-0.5, 0.5)


def gl_view_matrix(camera: Camera) -> np.ndarray:
    """(4, 4) OpenGL view matrix (world metres -> eye) of ``camera``.

    OpenGL eye axes are x right, y up, z backwards: OpenCV's with y and z negated.
    """
    view = np.eye(4)
    view[:3, :3] = camera.R
    view[:3, 3] = camera.t / 1000.0  # mm -> m
    return np.diag([1.0, -1.0, -1.0, 1.0]) @ view


def gl_projection_matrix(camera: Camera, near: float = NEAR_M, far: float = FAR_M) -> np.ndarray:
    """(4, 4) OpenGL projection of ``camera``'s intrinsics (an off-centre frustum).

    Maps u = fx x/z + s y/z + cx (OpenCV) to NDC x = 2 u / W - 1 and the image's top row to
    NDC y = +1, with the TinyRenderer sampling correction (see ``_SAMPLE_SHIFT``).
    """
    W, H, K = camera.width, camera.height, camera.K
    cx, cy = K[0, 2] + _SAMPLE_SHIFT[0], K[1, 2] + _SAMPLE_SHIFT[1]
    P = np.zeros((4, 4))
    P[0, 0], P[0, 1], P[0, 2] = 2 * K[0, 0] / W, -2 * K[0, 1] / W, 1 - 2 * cx / W
    P[1, 1], P[1, 2] = 2 * K[1, 1] / H, 2 * cy / H - 1
    P[2, 2], P[2, 3] = -(far + near) / (far - near), -2 * far * near / (far - near)
    P[3, 2] = -1.0
    return P


def gl_matrices(camera: Camera) -> tuple[list[float], list[float]]:
    """``camera``'s (view, projection) matrices as pybullet takes them: column-major lists."""
    return (
        gl_view_matrix(camera).T.reshape(-1).tolist(),
        gl_projection_matrix(camera).T.reshape(-1).tolist(),
    )


@dataclass(frozen=True)
class Render:
    """One rendered image."""

    rgb: np.ndarray
    """(H, W, 3) uint8 RGB; outside ``mask`` it is the renderer's plain clear colour."""
    mask: np.ndarray
    """(H, W) bool, True = person."""


def _import_pybullet():
    """Import pybullet without the "pybullet build time" banner its C code prints on import
    (to stderr), which every render worker would otherwise repeat."""
    import sys

    if "pybullet" in sys.modules:
        return sys.modules["pybullet"]
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            pybullet = import_extra("render", "pybullet")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return pybullet


class BodyRenderer:
    """One pybullet DIRECT client drawing the DeepMimic character (see the module docstring).

    Use as a context manager, or call :meth:`close`. Not thread-safe; one per process.
    """

    def __init__(self) -> None:
        pybullet = _import_pybullet()
        self._p = pybullet
        self._client = pybullet.connect(pybullet.DIRECT)
        self._body: int | None = None
        self._joint_index: dict[str, int] = {}
        self._link_index: dict[str, int] = {}
        self.height_scale = 1.0
        self._textures = self._load_textures()

    def __enter__(self) -> BodyRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None and self._p.isConnected(self._client):
            self._p.disconnect(self._client)
        self._client = None

    def _load_textures(self) -> dict[str, int]:
        """Load every texture once, in a fixed order (so texture ids match across processes).

        pybullet loads textures from files only; the files live just as long as the loading, so
        a worker killed later leaves nothing behind.
        """
        ids = {}
        with tempfile.TemporaryDirectory(prefix="posebert-textures-") as tmp:
            for name, image in texture_images().items():
                path = os.path.join(tmp, f"{name}.png")
                Image.fromarray(image).save(path)
                ids[name] = self._p.loadTexture(path, physicsClientId=self._client)
        return ids

    @property
    def body(self) -> int:
        if self._body is None:
            raise RuntimeError("BodyRenderer: call load_body() first")
        return self._body

    def load_body(
        self, height_scale: float = 1.0, thickness: dict[str, float] | None = None
    ) -> int:
        """(Re)load the character with body height factor ``height_scale`` and part thickness."""
        p, cid = self._p, self._client
        if self._body is not None:
            p.removeBody(self._body, physicsClientId=cid)
        text = body_urdf(thickness or {})
        # pybullet caches visual shapes by file name: a body written over an earlier file would
        # be drawn with the earlier one's shapes. A content-addressed name keeps them apart.
        name = f"humanoid-{hashlib.sha1(text.encode()).hexdigest()[:16]}.urdf"
        with tempfile.TemporaryDirectory(prefix="posebert-body-") as tmp:
            path = os.path.join(tmp, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            # a fixed base keeps the body where we put it (no physics step ever runs anyway)
            self._body = p.loadURDF(
                path, globalScaling=mocap.URDF_UNIT_M * height_scale, useFixedBase=True,
                physicsClientId=cid,
            )  # fmt: skip
        self.height_scale = height_scale
        # pybullet reorders joints on load: resolve them by name (link i is moved by joint i)
        names = [
            p.getJointInfo(self._body, i, physicsClientId=cid)[1].decode()
            for i in range(p.getNumJoints(self._body, physicsClientId=cid))
        ]
        self._joint_index = {n: i for i, n in enumerate(names)}
        self._link_index = dict(self._joint_index)
        return self._body

    def set_appearance(self, appearance: Appearance, height_scale: float = 1.0) -> None:
        """Load the body shaped by ``appearance`` and apply its colours and textures."""
        self.load_body(height_scale, appearance.thickness)
        for link in LINKS:
            r, g, b = appearance.colours.get(link, (1.0, 1.0, 1.0))
            kwargs = {"rgbaColor": [r, g, b, 1.0], "physicsClientId": self._client}
            if link in appearance.textures:
                kwargs["textureUniqueId"] = self._textures[appearance.textures[link]]
            self._p.changeVisualShape(self.body, self._link_index[link], **kwargs)

    def set_pose(self, clip: mocap.MotionClip, index: int) -> None:
        """Pose the body as frame ``index`` of ``clip`` (at the loaded height scale)."""
        pose = mocap.bullet_pose(clip, index, self.height_scale)
        p, cid = self._p, self._client
        p.resetBasePositionAndOrientation(
            self.body, pose.base_position, pose.base_orientation, physicsClientId=cid
        )
        p.resetJointStatesMultiDof(
            self.body,
            [self._joint_index[n] for n in pose.joint_names],
            [list(v) for v in pose.joint_values],
            physicsClientId=cid,
        )

    def joint_positions(self) -> dict[str, np.ndarray]:
        """URDF joint name -> (3,) world position in metres, as pybullet computes it."""
        p, out = self._p, {}
        for name, i in self._joint_index.items():
            state = p.getLinkState(self.body, i, computeForwardKinematics=True,
                                   physicsClientId=self._client)  # fmt: skip
            out[name] = np.array(state[4])  # URDF link frame = the joint's origin
        return out

    def link_orientation(self, name: str) -> np.ndarray:
        """(3, 3) world rotation of link ``name`` as pybullet computes it."""
        state = self._p.getLinkState(self.body, self._link_index[name],
                                     computeForwardKinematics=True,
                                     physicsClientId=self._client)  # fmt: skip
        return np.array(self._p.getMatrixFromQuaternion(state[5])).reshape(3, 3)

    def render(self, camera: Camera, light: Light | None = None) -> Render:
        """Draw the body as seen by ``camera`` (its full W x H image), without shadows."""
        p = self._p
        kwargs = {}
        if light is not None:
            kwargs = {
                "lightDirection": list(light.direction),
                "lightColor": list(light.colour),
                "lightAmbientCoeff": light.ambient,
                "lightDiffuseCoeff": light.diffuse,
                "lightSpecularCoeff": light.specular,
            }
        W, H = camera.width, camera.height
        _, _, rgba, _, seg = p.getCameraImage(
            W, H, *gl_matrices(camera),
            shadow=0, renderer=p.ER_TINY_RENDERER,
            flags=p.ER_SEGMENTATION_MASK_OBJECT_AND_LINKINDEX,
            physicsClientId=self._client, **kwargs,
        )  # fmt: skip
        mask = np.asarray(seg).reshape(H, W) >= 0  # -1 = background
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(H, W, 4)[..., :3]
        return Render(rgb, mask)


def composite(render: Render, background: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the rendered person over ``background`` (H, W, 3), through the mask."""
    return np.where(render.mask[..., None], render.rgb, background)


def benchmark(size: int = 128, frames: int = 400, clip: str = "walk") -> float:
    """Frames per second of one process rendering ``clip`` (pose + render + mask) at ``size``."""
    from data_shards.camera import person_box, ring_rig

    motion = mocap.resample(mocap.load_clip(clip), 50.0)
    joints = mocap.joints3d(motion)  # (N, J, 3)
    cams = ring_rig(4, target=(*joints[:, 0, :2].mean(0), 1000.0))
    with BodyRenderer() as renderer:
        renderer.load_body()
        start = time.perf_counter()
        for k in range(frames):
            i, cam = k % motion.num_frames, cams[k % len(cams)]
            renderer.set_pose(motion, i)
            crop = cam.crop(person_box(cam.project(joints[i])), (size, size))
            renderer.render(crop)
        return frames / (time.perf_counter() - start)


if __name__ == "__main__":  # python -m data_shards.render: single-core render speed
    for s in (128, 224):
        print(f"{s}x{s}: {benchmark(s):.0f} frames/s per core")
