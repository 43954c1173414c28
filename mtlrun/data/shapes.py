"""The built-in benchmark's generator: random scenes of 3D primitives, shaded, with their attributes."""

from __future__ import annotations

import colorsys
import math

import numpy as np

from mtlrun.data.raycast import (
    BOX,
    CYLINDER,
    FLOOR,
    FOV_DEGREES,
    LABELS,
    SPHERE,
    Box,
    Cylinder,
    Primitive,
    Scene,
    Sphere,
    camera_rays,
    camera_to_world,
    render_scene,
)
# The benchmark's class names, read from here by build_shapes.
from mtlrun.data.raycast import CLASS_NAMES as CLASS_NAMES

ATTRIBUTE_NAMES: tuple[str, ...] = (
    "has_sphere",              # a sphere is visible
    "has_box",                 # a box is visible
    "has_cylinder",            # a cylinder is visible
    "three_or_more_objects",   # at least 3 objects are visible
    "large_object",            # some object covers more than LARGE_OBJECT_FRACTION of the image
    "warm_colored_object",     # some visible object's hue is red, orange or yellow
    "occluded_object",         # some object has a visible share of its pixels hidden behind another object
)

# An object counts as visible (or as occluded) from this share of the image's pixels on: 8 pixels at 64x64.
MIN_VISIBLE_FRACTION = 0.002
# Tuned so that `large_object` holds for about half of the images.
LARGE_OBJECT_FRACTION = 0.05
# Hues (in turns) counted as warm: red through orange to yellow; a greyish colour has no meaningful hue.
WARM_HUE_BELOW = 60 / 360
WARM_HUE_FROM = 340 / 360
WARM_MIN_SATURATION = 0.3


def generate(num: int, image_size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """`num` scenes; sample i depends only on (seed, i), so a longer run extends a shorter one."""
    out = {
        "image": np.zeros((num, image_size, image_size, 3), np.uint8),
        "segmentation": np.zeros((num, image_size, image_size), np.int16),
        "depth": np.zeros((num, image_size, image_size), np.float32),
        "normal": np.zeros((num, image_size, image_size, 3), np.float32),
        "attributes": np.zeros((num, len(ATTRIBUTE_NAMES)), np.uint8),
    }
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        scene = _sample_scene(rng)
        render = render_scene(scene, image_size)
        out["image"][i] = _shade(scene, render, rng)
        for key in ("segmentation", "depth", "normal"):
            out[key][i] = render[key]
        out["attributes"][i] = _attributes(scene, render)
    return out


# --- sampling ----------------------------------------------------------------------------------


def _color(hsv: tuple[float, float, float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(*hsv))


def _sample_scene(rng: np.random.Generator) -> Scene:
    camera_height = rng.uniform(0.9, 1.5)
    floor_y = -camera_height
    half_width = math.tan(math.radians(FOV_DEGREES) / 2)
    objects: list[Primitive] = []
    footprints: list[tuple[float, float, float]] = []  # (x, z, radius) on the floor, to keep objects apart
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(3))
        for _attempt in range(20):
            z = rng.uniform(3.0, 10.0)
            x = rng.uniform(-0.8, 0.8) * z * half_width  # some objects are cut by the image border
            hsv = (rng.uniform(0.0, 1.0), rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
            obj: Primitive
            if kind == 0:
                r = rng.uniform(0.35, 1.0)
                obj, radius = Sphere((x, floor_y + r, z), r, hsv), r
            elif kind == 1:
                half = (rng.uniform(0.25, 0.75), rng.uniform(0.2, 0.8), rng.uniform(0.25, 0.75))
                obj = Box((x, floor_y + half[1], z), half, rng.uniform(0.0, math.pi / 2), hsv)
                radius = math.hypot(half[0], half[2])
            else:
                r = rng.uniform(0.3, 0.75)
                obj, radius = Cylinder((x, floor_y, z), r, rng.uniform(0.5, 2.0), hsv), r
            if all(math.hypot(x - x2, z - z2) > radius + r2 + 0.05 for x2, z2, r2 in footprints):
                objects.append(obj)
                footprints.append((x, z, radius))
                break

    elevation = math.radians(rng.uniform(25.0, 75.0))
    azimuth = math.pi + rng.uniform(-2 * math.pi / 3, 2 * math.pi / 3)  # mostly lit from the camera's side
    light = (
        math.cos(elevation) * math.sin(azimuth), math.sin(elevation), math.cos(elevation) * math.cos(azimuth)
    )
    floor_hue = rng.uniform(0.0, 1.0)
    value = rng.uniform(0.35, 0.85)
    other_value = float(np.clip(value + rng.choice([-1, 1]) * rng.uniform(0.12, 0.35), 0.1, 1.0))
    floor_colors = (
        colorsys.hsv_to_rgb(floor_hue, rng.uniform(0.0, 0.3), value),
        colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.3), other_value),
    )
    return Scene(
        objects=objects,
        floor_y=floor_y,
        pitch=math.radians(rng.uniform(4.0, 14.0)),
        light=light,
        ambient=rng.uniform(0.25, 0.45),
        floor_colors=floor_colors,
        floor_stripes=bool(rng.random() < 0.5),
        floor_scale=rng.uniform(0.4, 1.5),
        floor_angle=rng.uniform(0.0, math.pi),
        sky_top=colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.5), rng.uniform(0.6, 1.0)),
        sky_bottom=colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.5), rng.uniform(0.6, 1.0)),
        noise_std=rng.uniform(1.0, 5.0),
    )


# --- appearance and attributes -----------------------------------------------------------------


def _shade(scene: Scene, render: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Lambertian objects, a patterned floor and a gradient sky, with Gaussian noise: uint8 [H, W, 3]."""
    size = render["depth"].shape[0]
    to_world = camera_to_world(scene.pitch)
    depth = render["depth"].reshape(-1).astype(np.float64)
    label = render["segmentation"].reshape(-1)
    index = render["object_index"].reshape(-1)
    points = (camera_rays(size) * depth[:, None]) @ to_world.T
    normals = render["normal"].reshape(-1, 3).astype(np.float64) @ to_world.T

    light = np.asarray(scene.light, dtype=np.float64)
    light /= np.linalg.norm(light)
    brightness = scene.ambient + (1 - scene.ambient) * np.clip(normals @ light, 0.0, None)

    albedo = np.zeros((len(depth), 3))
    floor = label == FLOOR
    c, s = math.cos(scene.floor_angle), math.sin(scene.floor_angle)
    u = np.floor((c * points[floor, 0] + s * points[floor, 2]) / scene.floor_scale)
    v = np.floor((-s * points[floor, 0] + c * points[floor, 2]) / scene.floor_scale)
    second = (u % 2 == 1) if scene.floor_stripes else ((u + v) % 2 == 1)
    albedo[floor] = np.where(second[:, None], scene.floor_colors[1], scene.floor_colors[0])
    for k, obj in enumerate(scene.objects):
        albedo[index == k] = _color(obj.hsv)

    rgb = albedo * brightness[:, None]
    sky = label == -1
    row = np.repeat(np.arange(size), size) / max(size - 1, 1)
    fall = row[sky, None]
    rgb[sky] = (1 - fall) * np.asarray(scene.sky_top) + fall * np.asarray(scene.sky_bottom)
    rgb = rgb * 255 + rng.normal(0.0, scene.noise_std, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(size, size, 3)


def _attributes(scene: Scene, render: dict[str, np.ndarray]) -> np.ndarray:
    num_pixels = render["depth"].size
    min_pixels = max(1, round(MIN_VISIBLE_FRACTION * num_pixels))
    index = render["object_index"].ravel()
    counts = np.bincount(index[index >= 0], minlength=len(scene.objects))
    visible = counts >= min_pixels
    labels = np.array([LABELS[type(obj)] for obj in scene.objects], dtype=np.int64)
    warm = np.array(
        [(h < WARM_HUE_BELOW or h >= WARM_HUE_FROM) and s >= WARM_MIN_SATURATION for h, s, _ in
         (obj.hsv for obj in scene.objects)],
        dtype=bool,
    )
    values = {
        "has_sphere": (visible & (labels == SPHERE)).any(),
        "has_box": (visible & (labels == BOX)).any(),
        "has_cylinder": (visible & (labels == CYLINDER)).any(),
        "three_or_more_objects": visible.sum() >= 3,
        "large_object": counts.max(initial=0) > LARGE_OBJECT_FRACTION * num_pixels,
        "warm_colored_object": (visible & warm).any(),
        "occluded_object": (render["ray_hits"] - counts >= min_pixels).any(),
    }
    return np.array([values[name] for name in ATTRIBUTE_NAMES], dtype=np.uint8)
