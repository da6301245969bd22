"""Appearance of the rendered DeepMimic character, all drawn from a seed.

An :class:`Appearance` is everything about a rendered person that is not pose or camera:
body thickness per part, a colour and an optional texture per link, the lighting, and one
background photograph per view. Drawn from a ``numpy`` generator, so the same seed always gives
the same appearance (and, through the deterministic renderer, the same pixels).

The body *height* is not part of an appearance: it changes the 3D joints (see
:func:`data_shards.mocap.joints3d`), and several appearances of one instant must share one 3D
pose to serve as positives of each other (GUIDE section 6), so the caller draws it per window.

Assets are real images shipped in installed wheels: photographs of ``skimage/data`` (van der
Walt et al. 2014) as backgrounds and body textures, and pybullet's textures.
"""

from __future__ import annotations

import colorsys
import copy
import functools
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from data_shards.extras import import_extra

BODY_PARTS: dict[str, tuple[str, ...]] = {
    "torso": ("root", "chest"),
    "head": ("neck",),
    "arms": ("right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
             "left_wrist"),
    "legs": ("right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle"),
}  # fmt: skip
"""Body part -> URDF links (a link is named after the joint that moves it)."""
LINKS: tuple[str, ...] = tuple(link for links in BODY_PARTS.values() for link in links)

# Clothing groups for colouring: links that usually share a colour on a dressed person.
_GARMENTS: dict[str, tuple[str, ...]] = {
    "shirt": ("chest", "right_shoulder", "left_shoulder"),
    "sleeves": ("right_elbow", "left_elbow"),
    "trousers": ("root", "right_hip", "left_hip"),
    "legs": ("right_knee", "left_knee"),
    "shoes": ("right_ankle", "left_ankle"),
    "skin": ("neck", "right_wrist", "left_wrist"),
}

BACKGROUND_PHOTOS: tuple[str, ...] = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "rocket.jpg", "text.png",
)  # fmt: skip
"""Photographs in ``skimage/data`` used as backgrounds (read from the installed package)."""
_SKIMAGE_TEXTURES = (
    "astronaut.png",
    "brick.png",
    "chelsea.png",
    "coffee.png",
    "color.png",
    "grass.png",
    "gravel.png",
    "rocket.jpg",
    "chessboard_RGB.png",
    "coins.png",
)
_PYBULLET_TEXTURES = (
    "checker_blue.png",
    "checker_grid.jpg",
    "tex256.png",
    "uvmap.png",
    "cube.png",
    "duckCM.png",
    "jenga/jenga.png",
    "tray/tray.jpg",
    "table/table.png",
    "domino/domino.jpg",
    "racecar/meshes/wheel.jpg",
)
_TEXTURE_SIZES = (16, 64)  # coarse patches and fine patterns (TinyRenderer does not mipmap)


@dataclass(frozen=True)
class AppearanceConfig:
    """Ranges the appearance is drawn from."""

    thickness: tuple[float, float] = (0.8, 1.25)
    """Radius factor of torso, arms and legs (each part drawn separately)."""
    head_size: tuple[float, float] = (1.0, 1.12)
    """Head radius factor; >= 1 keeps the nose and head-top joints inside the head sphere."""
    texture_prob: float = 0.4
    """Probability that a garment gets a texture rather than a plain colour."""
    per_link_colour_prob: float = 0.15
    """Probability of a colour per link instead of per garment (a harder, less human look)."""
    ambient: tuple[float, float] = (0.3, 0.8)
    diffuse: tuple[float, float] = (0.2, 0.8)
    specular: tuple[float, float] = (0.0, 0.5)
    light_tint: float = 0.25
    """Largest deviation of each light colour channel from white."""
    background_zoom: tuple[float, float] = (0.35, 1.0)
    """Side of the photo region behind the person, as a fraction of the largest that fits."""

    def __post_init__(self) -> None:
        for name in ("thickness", "head_size", "ambient", "diffuse", "specular", "background_zoom"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"AppearanceConfig.{name}: need 0 <= low <= high, got {lo, hi}")
        if self.head_size[0] < 1.0:
            raise ValueError("AppearanceConfig.head_size below 1 puts head joints outside the head")
        if not 0 < self.background_zoom[1] <= 1:
            raise ValueError("AppearanceConfig.background_zoom must lie in (0, 1]")
        for name in ("texture_prob", "per_link_colour_prob", "light_tint"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AppearanceConfig.{name} must lie in [0, 1]")


@dataclass(frozen=True)
class Light:
    """TinyRenderer lighting of one scene (``getCameraImage`` arguments)."""

    direction: tuple[float, float, float]
    """Unit vector towards the light, world frame (Z up)."""
    colour: tuple[float, float, float]
    """RGB in [0, 1]."""
    ambient: float
    diffuse: float
    specular: float


@dataclass(frozen=True)
class Background:
    """A photo region behind one view: ``zoom`` and ``offset`` place it inside the photo."""

    photo: str
    """File name in :data:`BACKGROUND_PHOTOS`."""
    zoom: float
    """Region side / largest side that fits in the photo (at the views' aspect ratio)."""
    offset: tuple[float, float]
    """Position of the region in the free space of the photo, each in [0, 1]."""
    flip: bool
    """Mirror the photo left-right."""


@dataclass(frozen=True)
class Appearance:
    """One drawn appearance (see the module docstring)."""

    thickness: dict[str, float]
    """Body part (:data:`BODY_PARTS`) -> radius factor."""
    colours: dict[str, tuple[float, float, float]]
    """Link -> RGB in [0, 1] (multiplies the texture, if any)."""
    textures: dict[str, str]
    """Link -> texture name (see :func:`texture_images`); untextured links are absent."""
    light: Light
    backgrounds: tuple[Background, ...]
    """One per view rendered in this appearance."""

    def to_json(self) -> dict:
        """Plain JSON-able dict (for ``meta.extra``)."""
        return asdict(self)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _random_colour(rng: np.random.Generator, skin: bool = False) -> tuple[float, float, float]:
    if skin:  # hue/saturation/value box around human skin tones
        hsv = (rng.uniform(0.02, 0.11), rng.uniform(0.2, 0.65), rng.uniform(0.3, 0.95))
    else:
        hsv = (rng.uniform(0, 1), rng.uniform(0, 1) ** 0.7, rng.uniform(0.12, 1.0))
    return tuple(round(float(c), 4) for c in colorsys.hsv_to_rgb(*hsv))


def _draw_colours(
    rng: np.random.Generator, cfg: AppearanceConfig
) -> tuple[dict[str, tuple[float, float, float]], dict[str, str]]:
    names = texture_names()
    colours: dict[str, tuple[float, float, float]] = {}
    textures: dict[str, str] = {}
    per_link = rng.uniform() < cfg.per_link_colour_prob
    bare_arms, bare_legs = rng.uniform() < 0.3, rng.uniform() < 0.2  # short sleeves, shorts
    skin_tone = _random_colour(rng, skin=True)  # one person, one skin tone
    for garment, links in _GARMENTS.items():
        skin = garment == "skin" or (garment == "sleeves" and bare_arms)
        skin = skin or (garment == "legs" and bare_legs)
        colour = skin_tone if skin else _random_colour(rng)
        texture = names[rng.integers(len(names))] if rng.uniform() < cfg.texture_prob else None
        for link in links:
            colours[link] = _random_colour(rng) if per_link else colour
            if texture is not None and not skin:
                textures[link] = texture
    if not per_link and rng.uniform() < 0.25:  # the two garments of a suit or a dress
        colours.update({link: colours["chest"] for link in _GARMENTS["trousers"]})
    return colours, textures


def _draw_light(rng: np.random.Generator, cfg: AppearanceConfig) -> Light:
    azimuth, elevation = rng.uniform(0, 2 * np.pi), rng.uniform(np.deg2rad(10), np.deg2rad(85))
    direction = (
        np.cos(elevation) * np.cos(azimuth),
        np.cos(elevation) * np.sin(azimuth),
        np.sin(elevation),
    )
    colour = 1.0 - rng.uniform(0, cfg.light_tint, size=3)
    return Light(
        direction=tuple(round(float(d), 6) for d in direction),
        colour=tuple(round(float(c), 4) for c in colour),
        ambient=round(_uniform(rng, cfg.ambient), 4),
        diffuse=round(_uniform(rng, cfg.diffuse), 4),
        specular=round(_uniform(rng, cfg.specular), 4),
    )


def draw_background(rng: np.random.Generator, cfg: AppearanceConfig) -> Background:
    return Background(
        photo=BACKGROUND_PHOTOS[rng.integers(len(BACKGROUND_PHOTOS))],
        zoom=round(_uniform(rng, cfg.background_zoom), 4),
        offset=(round(float(rng.uniform()), 4), round(float(rng.uniform()), 4)),
        flip=bool(rng.uniform() < 0.5),
    )


def draw_appearance(
    rng: np.random.Generator, num_views: int, cfg: AppearanceConfig | None = None
) -> Appearance:
    """A random :class:`Appearance` with one background per view."""
    cfg = cfg or AppearanceConfig()
    thickness = {part: round(_uniform(rng, cfg.thickness), 4) for part in ("torso", "arms", "legs")}
    thickness["head"] = round(_uniform(rng, cfg.head_size), 4)
    colours, textures = _draw_colours(rng, cfg)
    light = _draw_light(rng, cfg)
    backgrounds = tuple(draw_background(rng, cfg) for _ in range(num_views))
    return Appearance(thickness, colours, textures, light, backgrounds)


# ----------------------------------------------------------------------------- body model


def humanoid_urdf_path() -> str:
    pybullet_data = import_extra("render", "pybullet_data")  # data only; does not load pybullet
    return os.path.join(pybullet_data.getDataPath(), "humanoid", "humanoid.urdf")


@functools.lru_cache(maxsize=1)
def _humanoid_urdf_text() -> str:
    with open(humanoid_urdf_path(), encoding="utf-8") as f:
        return f.read().rstrip("\x00\r\n ")  # the shipped file ends with a NUL byte


# Ball joints drawn at joint centres, URDF units: (link, radius, y offset on the link).
# pybullet draws the URDF's capsules with pointed low-poly caps that end at (or just short of)
# the joints, so without these the shoulders, elbows, hips and knees often project outside the
# silhouette (shoulders fell inside the mask in only 43% of views) and limbs look detached.
_JOINT_BALLS: tuple[tuple[str, float, float], ...] = (
    ("chest", 0.30, 0.0),  # waist, between the pelvis and chest spheres
    ("right_shoulder", 0.18, 0.0), ("left_shoulder", 0.18, 0.0),
    ("right_elbow", 0.16, 0.0), ("left_elbow", 0.16, 0.0),
    ("right_hip", 0.22, 0.0), ("left_hip", 0.22, 0.0),
    ("right_knee", 0.20, 0.0), ("left_knee", 0.20, 0.0),
    ("neck", 0.17, 0.25),  # the neck itself, under the head sphere
)  # fmt: skip


def body_urdf(thickness: dict[str, float]) -> str:
    """Text of ``humanoid.urdf`` with visual shapes, each body part thickened by its factor.

    The shipped file has collision shapes only; we add explicit visuals: the collision shapes
    plus ball joints (:data:`_JOINT_BALLS`). Sphere radii scale; a capsule's radius scales
    while its tip-to-tip extent stays; feet (boxes) scale in width only, so the ankle joint
    stays inside the sole. Collision shapes are left as shipped (no physics runs). Spherical
    joints get an explicit axis, which pybullet ignores but otherwise warns about on each load.
    """
    part_of = {link: part for part, links in BODY_PARTS.items() for link in links}
    balls = {name: (radius, y) for name, radius, y in _JOINT_BALLS}
    root = ET.fromstring(_humanoid_urdf_text())
    for link in root.iter("link"):
        name = link.get("name")
        factor = float(thickness.get(part_of.get(name, ""), 1.0))
        for collision in link.findall("collision"):
            visual = copy.deepcopy(collision)
            visual.tag = "visual"
            for shape in visual.find("geometry"):
                _thicken(shape, factor)
            link.append(visual)
        if name in balls:
            radius, y = balls[name]
            visual = ET.SubElement(link, "visual")
            ET.SubElement(visual, "origin", rpy="0 0 0", xyz=f"0 {y} 0")
            geometry = ET.SubElement(visual, "geometry")
            ET.SubElement(geometry, "sphere", radius=f"{radius * factor:.6f}")
    for joint in root.iter("joint"):
        if joint.get("type") == "spherical" and joint.find("axis") is None:
            ET.SubElement(joint, "axis", xyz="0 0 1")
    return ET.tostring(root, encoding="unicode")


def _thicken(shape: ET.Element, factor: float) -> None:
    if shape.tag == "sphere":
        shape.set("radius", f"{float(shape.get('radius')) * factor:.6f}")
    elif shape.tag == "capsule":
        radius, length = float(shape.get("radius")), float(shape.get("length"))
        shape.set("radius", f"{radius * factor:.6f}")
        shape.set("length", f"{length + 2 * radius * (1 - factor):.6f}")
    elif shape.tag == "box":
        x, y, z = (float(s) for s in shape.get("size").split())
        shape.set("size", f"{x:.6f} {y:.6f} {z * factor:.6f}")


# ----------------------------------------------------------------------------- images


def _skimage_dir() -> str:
    import skimage.data

    return os.path.dirname(skimage.data.__file__)


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@functools.lru_cache(maxsize=1)
def texture_names() -> tuple[str, ...]:
    """Names of the body textures (stable order: texture ids follow it)."""
    stems = [f"sk_{os.path.splitext(n)[0]}" for n in _SKIMAGE_TEXTURES]
    stems += [f"pb_{os.path.splitext(os.path.basename(n))[0]}" for n in _PYBULLET_TEXTURES]
    return tuple(f"{stem}_{size}" for stem in stems for size in _TEXTURE_SIZES)


def texture_images() -> dict[str, np.ndarray]:
    """Texture name -> (S, S, 3) uint8 image, S in 16 / 64 pixels."""
    pybullet_data = import_extra("render", "pybullet_data")
    sources = [os.path.join(_skimage_dir(), n) for n in _SKIMAGE_TEXTURES]
    sources += [os.path.join(pybullet_data.getDataPath(), n) for n in _PYBULLET_TEXTURES]
    names = iter(texture_names())
    out = {}
    for path in sources:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            for size in _TEXTURE_SIZES:
                small = rgb.resize((size, size), Image.Resampling.BOX)
                out[next(names)] = np.asarray(small)
    return out


@functools.cache
def background_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 photo ``name`` of :data:`BACKGROUND_PHOTOS` (grey ones as RGB)."""
    if name not in BACKGROUND_PHOTOS:
        raise ValueError(f"unknown background photo {name!r}")
    return _read_rgb(os.path.join(_skimage_dir(), name))


def background_crops(bg: Background, boxes: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    """The background behind a moving crop: one (H, W, 3) uint8 image per crop box.

    ``boxes`` (T, 4) are the crop boxes of one view in full-image pixels. The photo region is
    laid over the union of the boxes, so the background moves consistently with the crop as a
    static backdrop would.
    """
    photo = background_photo(bg.photo)
    ph, pw = photo.shape[:2]
    u0, v0 = boxes[:, 0].min(), boxes[:, 1].min()
    uw, vh = boxes[:, 2].max() - u0, boxes[:, 3].max() - v0
    fit = min(pw / uw, ph / vh)  # photo pixels per image pixel for the largest region that fits
    s = fit * bg.zoom
    ox = bg.offset[0] * (pw - uw * s)
    oy = bg.offset[1] * (ph - vh * s)
    image = Image.fromarray(np.ascontiguousarray(photo[:, ::-1]) if bg.flip else photo)
    out = []
    for x0, y0, x1, y1 in boxes:
        region = (ox + (x0 - u0) * s, oy + (y0 - v0) * s, ox + (x1 - u0) * s, oy + (y1 - v0) * s)
        # clamp float round-off at the photo's border; resize with a box filters (antialiased)
        region = (max(region[0], 0.0), max(region[1], 0.0), min(region[2], pw), min(region[3], ph))
        out.append(np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=region)))
    return out
