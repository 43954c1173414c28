"""Scenes of 3D primitives and their ray casting: each pixel's class, depth and surface normal."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("floor", "sphere", "box", "cylinder")
FLOOR, SPHERE, BOX, CYLINDER = range(len(CLASS_NAMES))

FOV_DEGREES = 60.0


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    hsv: tuple[float, float, float] = (0.0, 0.0, 0.7)


@dataclass(frozen=True)
class Box:
    """Axis-aligned box of half-extents `half_size`, then turned by `yaw` radians about the vertical axis."""

    center: tuple[float, float, float]
    half_size: tuple[float, float, float]
    yaw: float = 0.0
    hsv: tuple[float, float, float] = (0.0, 0.0, 0.7)


@dataclass(frozen=True)
class Cylinder:
    """Vertical cylinder with flat caps, standing on its bottom cap's centre `base`."""

    base: tuple[float, float, float]
    radius: float
    height: float
    hsv: tuple[float, float, float] = (0.0, 0.0, 0.7)


Primitive = Sphere | Box | Cylinder
Rgb = tuple[float, float, float]
LABELS: dict[type, int] = {Sphere: SPHERE, Box: BOX, Cylinder: CYLINDER}


@dataclass
class Scene:
    """Everything one image is made of.

    World frame: the camera sits at the origin, y is up, z is forward along the ground. The camera is
    tilted down by `pitch` radians about the x axis, so camera coordinates equal world coordinates when
    pitch = 0. The floor is the plane y = floor_y, from the camera out to world z = floor_far.
    """

    objects: list[Primitive] = field(default_factory=list)
    floor_y: float = -1.0
    pitch: float = 0.0
    floor_far: float = 15.0
    light: tuple[float, float, float] = (0.3, 0.8, -0.5)   # towards the light, normalised when shading
    ambient: float = 0.3
    floor_colors: tuple[Rgb, Rgb] = ((0.4, 0.4, 0.4), (0.7, 0.7, 0.7))
    floor_stripes: bool = False                            # stripes instead of a checkerboard
    floor_scale: float = 1.0                               # side of a square (width of a stripe)
    floor_angle: float = 0.0                               # rotation of the pattern on the floor
    sky_top: tuple[float, float, float] = (0.5, 0.7, 0.9)
    sky_bottom: tuple[float, float, float] = (0.8, 0.85, 0.9)
    noise_std: float = 0.0                                 # Gaussian pixel noise, in 0..255 units


@lru_cache(maxsize=8)
def camera_rays(image_size: int) -> np.ndarray:
    """Camera-space directions through the pixel centres, [H*W, 3] row-major, scaled to z = 1.

    With z = 1, the ray parameter t of a hit is its camera-space z-depth.
    """
    half_width = math.tan(math.radians(FOV_DEGREES) / 2)
    coords = ((np.arange(image_size) + 0.5) / image_size * 2 - 1) * half_width
    x, y = np.meshgrid(coords, -coords)  # row 0 is the top of the image
    rays = np.stack([x.ravel(), y.ravel(), np.ones(image_size * image_size)], axis=1)
    rays.flags.writeable = False
    return rays


def camera_to_world(pitch: float) -> np.ndarray:
    """Rotation taking camera to world coordinates; its columns are the camera's right, up and forward."""
    c, s = math.cos(pitch), math.sin(pitch)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _hit_floor(d: np.ndarray, floor_y: float, floor_far: float) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = floor_y / d[:, 1]
    hit = (d[:, 1] < 0) & (t * d[:, 2] <= floor_far)
    normal = np.zeros_like(d)
    normal[:, 1] = 1.0
    return np.where(hit, t, np.inf), normal


def _hit_sphere(d: np.ndarray, s: Sphere) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(s.center, dtype=np.float64)
    # |t d - c|^2 = r^2  <=>  a t^2 - 2 b t + k = 0; the smaller root is where the ray enters.
    a = np.einsum("ij,ij->i", d, d)
    b = d @ c
    k = c @ c - s.radius**2
    disc = b * b - a * k
    with np.errstate(invalid="ignore"):
        t = (b - np.sqrt(disc)) / a
    t = np.where((disc >= 0) & (t > 0), t, np.inf)
    with np.errstate(invalid="ignore"):
        normal = (t[:, None] * d - c) / s.radius
    return t, normal


def _yaw_matrix(yaw: float) -> np.ndarray:
    """Rotation by `yaw` about the vertical axis, taking box coordinates to world coordinates."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hit_box(d: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray]:
    rot = _yaw_matrix(box.yaw)
    origin = -rot.T @ np.asarray(box.center, dtype=np.float64)  # the camera, in box coordinates
    local = d @ rot
    half = np.asarray(box.half_size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - origin) / local
        t2 = (half - origin) / local
    # fmin/fmax skip the NaN of 0/0 (a ray parallel to a slab, starting on its boundary): the other
    # bound of that slab is then -inf or inf, so near and far hold no NaN.
    near = np.fmin(t1, t2)
    far = np.fmax(t1, t2)
    axis = near.argmax(axis=1)
    t_enter = near[np.arange(len(d)), axis]
    t_exit = far.min(axis=1)
    t = np.where((t_enter <= t_exit) & (t_enter > 0), t_enter, np.inf)
    # The entry face is the slab entered last; its outward normal points against the ray.
    normal_local = np.zeros_like(d)
    normal_local[np.arange(len(d)), axis] = -np.sign(local[np.arange(len(d)), axis])
    return t, normal_local @ rot.T


def _hit_cylinder(d: np.ndarray, cyl: Cylinder) -> tuple[np.ndarray, np.ndarray]:
    cx, y0, cz = cyl.base
    y1 = y0 + cyl.height
    r = cyl.radius
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    # Side: |t (dx, dz) - (cx, cz)|^2 = r^2, entering root, within the cylinder's height.
    a = dx * dx + dz * dz
    b = dx * cx + dz * cz
    disc = b * b - a * (cx * cx + cz * cz - r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (b - np.sqrt(disc)) / a
    y = t_side * dy
    side = (a > 0) & (disc >= 0) & (t_side > 0) & (y >= y0) & (y <= y1)
    t = np.where(side, t_side, np.inf)
    normal = np.stack([(t_side * dx - cx) / r, np.zeros_like(dx), (t_side * dz - cz) / r], axis=1)
    # Caps: the nearest valid surface point is where a ray from outside enters this convex solid.
    for cap_y, normal_y in ((y1, 1.0), (y0, -1.0)):
        with np.errstate(divide="ignore", invalid="ignore"):
            t_cap = cap_y / dy
            inside = (t_cap * dx - cx) ** 2 + (t_cap * dz - cz) ** 2 <= r * r
        closer = (dy != 0) & (t_cap > 0) & inside & (t_cap < t)
        t = np.where(closer, t_cap, t)
        normal[closer] = (0.0, normal_y, 0.0)
    return t, normal


def _hit(d: np.ndarray, obj: Primitive) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(obj, Sphere):
        return _hit_sphere(d, obj)
    if isinstance(obj, Box):
        return _hit_box(d, obj)
    return _hit_cylinder(d, obj)


def render_scene(scene: Scene, image_size: int) -> dict[str, np.ndarray]:
    """Cast one ray per pixel centre; the nearest hit wins.

    Returns segmentation [H, W] (-1 for sky), depth [H, W] (camera-space z, 0 for sky), normal [H, W, 3]
    (unit, camera coordinates, 0 for sky), object_index [H, W] (index into scene.objects, -1 for floor and
    sky) and ray_hits [num_objects] (pixels whose ray meets each object, whether it is in front or not).
    """
    rays = camera_rays(image_size)
    to_world = camera_to_world(scene.pitch)
    d = rays @ to_world.T
    best_t, best_normal = _hit_floor(d, scene.floor_y, scene.floor_far)
    label = np.where(np.isfinite(best_t), FLOOR, -1).astype(np.int16)
    object_index = np.full(len(d), -1, np.int16)
    ray_hits = np.zeros(len(scene.objects), np.int64)
    for k, obj in enumerate(scene.objects):
        t, normal = _hit(d, obj)
        ray_hits[k] = np.isfinite(t).sum()
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        best_normal[closer] = normal[closer]
        label[closer] = LABELS[type(obj)]
        object_index[closer] = k
    valid = np.isfinite(best_t)
    depth = np.where(valid, best_t, 0.0)  # rays have z = 1 in camera space, so t is the z-depth
    normal_camera = best_normal @ to_world  # world to camera is the transpose
    normal_camera[~valid] = 0.0
    shape = (image_size, image_size)
    return {
        "segmentation": label.reshape(shape),
        "depth": depth.astype(np.float32).reshape(shape),
        "normal": normal_camera.astype(np.float32).reshape(*shape, 3),
        "object_index": object_index.reshape(shape),
        "ray_hits": ray_hits,
    }
