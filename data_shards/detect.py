"""2D keypoints from pixels: find and track one person, and map the detector to the 17 joints.

The detector is BlazePose (MediaPipe 0.10.14's legacy ``solutions.pose``): its person detector
and full landmark model ship inside the wheel, so it runs offline on the CPU (TFLite, XNNPACK).
Later MediaPipe releases need numpy < 2 or download their models, which a cluster node or this
project's CI cannot do. It is installed without the dependencies its wheel declares (jax,
jaxlib, a GUI OpenCV build, sounddevice: the pose solution imports none of them): ``make
install`` runs ``pip install --no-deps mediapipe==0.10.14`` beside the ``video`` extra, which
holds what it does import.

BlazePose gives 33 landmarks (image fractions and a visibility in [0, 1]). The 17 joints of
:mod:`data_shards.skeleton` are taken from them by this rule (L/R: the subject's sides):

- hips, knees, ankles, shoulders, elbows, wrists, nose: the landmark of that name;
- pelvis: the midpoint of the two hips; thorax: the midpoint of the two shoulders;
- spine: the point :data:`SPINE_AT` of the way from the pelvis to the thorax;
- head top: from the midpoint of the ears, :data:`HEAD_TOP_UP` times the vector from the mouth
  midpoint to the eye midpoint (the face's "up");
- confidence of a joint: the visibility of its landmark, or the lowest visibility of the
  landmarks it is built from.

The two constants were chosen on the embedded renders (5 clips x 4 cameras at 256 px, 1,173
detected frames, against the projected ground truth) as the values with the lowest mean and
median pixel error on a grid (spine 0.4-0.6, head 0.5-3.0): median 4.4 px for the spine and
4.9 px for the head top, against 11 px over all 17 joints.

Tracking: the landmark model runs in its tracking mode (it follows the person from frame to
frame and re-detects when lost). A frame counts as found when both shoulders are visible with
at least ``min_torso``. :class:`BoxTracker` turns the joints into a
square, person-centred crop with a margin, smoothed over frames so the crop does not jitter.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import NamedTuple

import numpy as np

from data_shards.extras import import_extra
from data_shards.skeleton import JOINT_INDEX, NUM_JOINTS

# BlazePose landmark indices (mediapipe.solutions.pose.PoseLandmark)
NOSE, L_EYE, R_EYE, L_EAR, R_EAR, MOUTH_L, MOUTH_R = 0, 2, 5, 7, 8, 9, 10
L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 11, 12, 13, 14, 15, 16
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 23, 24, 25, 26, 27, 28
TORSO = (L_SHOULDER, R_SHOULDER, L_HIP, R_HIP)

DIRECT = {"r_hip": R_HIP, "r_knee": R_KNEE, "r_ankle": R_ANKLE, "l_hip": L_HIP,
          "l_knee": L_KNEE, "l_ankle": L_ANKLE, "nose": NOSE, "l_shoulder": L_SHOULDER,
          "l_elbow": L_ELBOW, "l_wrist": L_WRIST, "r_shoulder": R_SHOULDER,
          "r_elbow": R_ELBOW, "r_wrist": R_WRIST}  # fmt: skip
"""Joints that are one landmark."""

SPINE_AT = 0.5
"""Spine = pelvis + SPINE_AT * (thorax - pelvis)."""
HEAD_TOP_UP = 2.5
"""Head top = ear midpoint + HEAD_TOP_UP * (eye midpoint - mouth midpoint)."""


@dataclasses.dataclass(frozen=True)
class DetectConfig:
    """How people are found, followed and cropped."""

    min_detection: float = 0.3
    """Person-detector confidence to start tracking."""
    min_tracking: float = 0.3
    """Landmark confidence to keep tracking (below it the detector runs again)."""
    min_torso: float = 0.5
    """A frame counts as found when both shoulders are at least this visible (a half-body shot
    still counts; its hidden joints carry their low confidence)."""
    min_side: int = 256
    """Frames smaller than this (longer side) are upscaled before detection."""
    max_side: int = 640
    """Frames larger than this (longer side) are downscaled before detection (4K video)."""
    margin: float = 0.25
    """Crop margin around the joints' extent, as a fraction of it, on every side."""
    smoothing: float = 0.6
    """Weight of the previous crop box in the running average (0: none)."""

    def __post_init__(self) -> None:
        for name in ("min_detection", "min_tracking", "min_torso"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")
        if not 0 < self.min_side <= self.max_side or self.margin < 0:
            raise ValueError("need 0 < min_side <= max_side and margin >= 0")


class Detection(NamedTuple):
    """One person in one image."""

    joints: np.ndarray
    """(17, 2) float64, pixels of the image that was passed in."""
    confidence: np.ndarray
    """(17,) float64 in [0, 1]."""
    landmarks: np.ndarray
    """(33, 3) float64: BlazePose's x, y (pixels) and visibility."""

    def as_det2d(self) -> np.ndarray:
        """(17, 3) float32: x, y, confidence (the shard member ``det2d``)."""
        return np.concatenate([self.joints, self.confidence[:, None]], 1).astype(np.float32)


MISSED = np.zeros((NUM_JOINTS, 3), np.float32)
"""``det2d`` of a frame where nobody was found."""


def to_joints17(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(33, 3) BlazePose landmarks (x, y, visibility) -> (17, 2) joints and (17,) confidences
    by the rule of the module docstring."""
    xy, vis = landmarks[:, :2].astype(np.float64), landmarks[:, 2].astype(np.float64)
    joints, conf = np.zeros((NUM_JOINTS, 2)), np.zeros(NUM_JOINTS)

    def put(name: str, point: np.ndarray, sources: tuple[int, ...]) -> None:
        joints[JOINT_INDEX[name]], conf[JOINT_INDEX[name]] = point, vis[list(sources)].min()

    for name, lm in DIRECT.items():
        put(name, xy[lm], (lm,))
    pelvis, thorax = xy[[L_HIP, R_HIP]].mean(0), xy[[L_SHOULDER, R_SHOULDER]].mean(0)
    put("pelvis", pelvis, (L_HIP, R_HIP))
    put("thorax", thorax, (L_SHOULDER, R_SHOULDER))
    put("spine", pelvis + SPINE_AT * (thorax - pelvis), TORSO)
    up = xy[[L_EYE, R_EYE]].mean(0) - xy[[MOUTH_L, MOUTH_R]].mean(0)
    put("head", xy[[L_EAR, R_EAR]].mean(0) + HEAD_TOP_UP * up,
        (L_EAR, R_EAR, L_EYE, R_EYE, MOUTH_L, MOUTH_R))
    return joints, np.clip(conf, 0.0, 1.0)


def _mediapipe_pose():
    # MediaPipe's C++ logs and a protobuf deprecation would print on every run
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype", category=UserWarning)
    return import_extra("video", "mediapipe.python.solutions.pose")


class Detector:
    """BlazePose on one stream of frames (tracking) or on unrelated images; a context manager.
    Call it with an (H, W, 3) uint8 RGB image; returns a :class:`Detection` or None."""

    def __init__(self, config: DetectConfig | None = None, tracking: bool = True) -> None:
        self.config = config or DetectConfig()
        pose = _mediapipe_pose()
        self._pose = pose.Pose(static_image_mode=not tracking,
                               model_complexity=1,  # the full model: the one in the wheel
                               smooth_landmarks=tracking,
                               min_detection_confidence=self.config.min_detection,
                               min_tracking_confidence=self.config.min_tracking)  # fmt: skip

    def reset(self) -> None:
        """Forget the tracked person (a new stream starts)."""
        self._pose.reset()

    def close(self) -> None:
        self._pose.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, image: np.ndarray) -> Detection | None:
        H, W = image.shape[:2]
        side = max(H, W)
        scale = 1.0
        if side < self.config.min_side or side > self.config.max_side:
            scale = (self.config.min_side if side < self.config.min_side
                     else self.config.max_side) / side  # fmt: skip
            image = resize_rgb(image, (round(W * scale), round(H * scale)))
        result = self._pose.process(np.ascontiguousarray(image))
        if result.pose_landmarks is None:
            return None
        h, w = image.shape[:2]
        lm = np.array([(p.x * w / scale, p.y * h / scale, p.visibility)
                       for p in result.pose_landmarks.landmark])  # fmt: skip
        if lm[[L_SHOULDER, R_SHOULDER], 2].min() < self.config.min_torso:
            return None
        joints, conf = to_joints17(lm)
        return Detection(joints, conf, lm)


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[1], size[0], 3), bilinear."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


class BoxTracker:
    """Square crop boxes (x0, y0, x1, y1) centred on the person, smoothed over frames."""

    def __init__(self, margin: float = 0.25, smoothing: float = 0.6) -> None:
        self.margin, self.smoothing = margin, smoothing
        self._state: np.ndarray | None = None  # (cx, cy, side)

    def reset(self) -> None:
        """After a gap the crop follows the person from scratch."""
        self._state = None

    def update(self, joints: np.ndarray, confidence: np.ndarray) -> tuple[float, ...]:
        """The box of the next frame from its (17, 2) joints (those with confidence > 0.3,
        or all of them when fewer than 4 are)."""
        sure = joints[confidence > 0.3] if (confidence > 0.3).sum() >= 4 else joints
        lo, hi = sure.min(0), sure.max(0)
        side = max(float((hi - lo).max()), 1.0) * (1 + 2 * self.margin)
        now = np.array([*(lo + hi) / 2, side])
        if self._state is not None:
            now = self.smoothing * self._state + (1 - self.smoothing) * now
        self._state = now
        cx, cy, s = now
        return (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)


class PersonCrops:
    """One video's person: detection and tracking (:class:`Detector`) and the smoothed crop box
    (:class:`BoxTracker`) of every frame handed in, in order; counts frames found and lost."""

    def __init__(self, config: DetectConfig | None = None) -> None:
        self.config = config or DetectConfig()
        self.detector = Detector(self.config, tracking=True)
        self.boxes = BoxTracker(self.config.margin, self.config.smoothing)
        self.found = self.lost = 0

    def __call__(self, image: np.ndarray) -> tuple[tuple[float, ...], Detection] | None:
        """(crop box in the image's pixels, detection) of the next frame, or None (lost: the
        box starts afresh at the next detection)."""
        det = self.detector(image)
        if det is None:
            self.lost += 1
            self.boxes.reset()
            return None
        self.found += 1
        return self.boxes.update(det.joints, det.confidence), det

    def close(self) -> None:
        self.detector.close()

    def __enter__(self) -> PersonCrops:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
