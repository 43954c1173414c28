"""The built-in benchmark's generator: array contract, determinism, exact geometry, attribute balance."""

import math

import numpy as np
import pytest

from mtlrun.data import raycast, shapes
from mtlrun.data.shapes import BOX, CYLINDER, FLOOR, SPHERE, Box, Cylinder, Scene, Sphere


def _rays(size: int) -> np.ndarray:
    """Camera-space rays through the pixel centres of the pinhole camera, [H, W, 3], written out anew."""
    half = math.tan(math.radians(shapes.FOV_DEGREES) / 2)
    coords = ((np.arange(size) + 0.5) / size * 2 - 1) * half
    x = np.broadcast_to(coords[None, :], (size, size))
    y = np.broadcast_to(-coords[:, None], (size, size))  # row 0 is the top
    return 0.7 * np.stack([x, y, np.ones((size, size))], axis=-1)  # any length: the direction is what counts


def _points(render: dict, size: int) -> np.ndarray:
    """Hit points in camera coordinates from the z-depth: p = ray * depth / ray_z."""
    rays = _rays(size)
    return rays * (render["depth"].astype(np.float64) / rays[..., 2])[..., None]


@pytest.fixture(scope="module")
def sample() -> dict[str, np.ndarray]:
    return shapes.generate(400, 64, seed=0)


# --- array contract ----------------------------------------------------------------------------


def test_arrays_have_documented_shapes_dtypes_and_ranges():
    out = shapes.generate(12, 32, seed=3)
    assert set(out) == {"image", "segmentation", "depth", "normal", "attributes"}
    assert out["image"].shape == (12, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["segmentation"].shape == (12, 32, 32) and out["segmentation"].dtype == np.int16
    assert out["depth"].shape == (12, 32, 32) and out["depth"].dtype == np.float32
    assert out["normal"].shape == (12, 32, 32, 3) and out["normal"].dtype == np.float32
    assert out["attributes"].shape == (12, len(shapes.ATTRIBUTE_NAMES))
    assert out["attributes"].dtype == np.uint8
    assert out["segmentation"].min() >= -1 and out["segmentation"].max() < len(shapes.CLASS_NAMES)
    assert set(np.unique(out["attributes"])) <= {0, 1}
    depth = out["depth"]
    assert np.isfinite(depth).all() and np.isfinite(out["normal"]).all()
    assert depth.min() == 0 and 0.5 < depth[depth > 0].min() and depth.max() < 20
    assert out["image"].std() > 10  # not a blank picture


def test_names():
    assert shapes.CLASS_NAMES == ("floor", "sphere", "box", "cylinder")
    assert 5 <= len(shapes.ATTRIBUTE_NAMES) <= 7
    assert len(set(shapes.ATTRIBUTE_NAMES)) == len(shapes.ATTRIBUTE_NAMES)


def test_sky_is_invalid_in_every_target_and_valid_normals_are_unit_and_face_the_camera(sample):
    seg, depth, normal = sample["segmentation"], sample["depth"], sample["normal"]
    sky = seg == -1
    assert sky.any() and (~sky).any()
    np.testing.assert_array_equal(sky, depth == 0)
    np.testing.assert_array_equal(sky, (normal == 0).all(axis=-1))
    assert (depth[~sky] > 0).all()
    np.testing.assert_allclose(np.linalg.norm(normal[~sky], axis=-1), 1.0, atol=1e-4)
    # Facing the camera: the normal points against the pixel's ray.
    facing = np.einsum("nhwc,hwc->nhw", normal, _rays(64))
    assert (facing[~sky] <= 1e-6).all()


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_is_bit_identical_and_a_longer_run_extends_a_shorter_one():
    first, again = shapes.generate(5, 24, seed=7), shapes.generate(5, 24, seed=7)
    longer = shapes.generate(9, 24, seed=7)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
        np.testing.assert_array_equal(first[key], longer[key][:5])


def test_different_seeds_give_different_data():
    a, b = shapes.generate(5, 24, seed=0), shapes.generate(5, 24, seed=1)
    for key in ("image", "segmentation", "depth", "normal"):
        assert not np.array_equal(a[key], b[key])


def test_samples_differ_from_each_other(sample):
    assert len({sample["image"][i].tobytes() for i in range(20)}) == 20


# --- exact geometry on hand-built scenes -------------------------------------------------------


@pytest.mark.parametrize("center, radius", [((0.0, 0.0, 5.0), 1.0), ((0.4, -0.2, 6.0), 0.8)])
def test_sphere_depth_hit_points_and_normals_are_exact(center, radius):
    size = 65  # odd: the middle pixel's ray is the optical axis
    render = raycast.render_scene(Scene([Sphere(center, radius)], floor_y=-5.0), size)
    c = np.asarray(center)
    # Middle pixel: the ray (0, 0, 1) enters the sphere at z = cz - sqrt(r^2 - cx^2 - cy^2).
    assert render["segmentation"][32, 32] == SPHERE
    entry = c[2] - math.sqrt(radius**2 - c[0] ** 2 - c[1] ** 2)
    assert render["depth"][32, 32] == pytest.approx(entry, abs=1e-5)

    mask = render["segmentation"] == SPHERE
    points = _points(render, size)[mask]
    np.testing.assert_allclose(np.linalg.norm(points - c, axis=-1), radius, atol=1e-3)
    np.testing.assert_allclose(render["normal"][mask], (points - c) / radius, atol=1e-3)

    # Exactly the pixels whose ray passes within r of the centre are sphere pixels.
    rays = _rays(size)
    unit = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    miss_distance = np.linalg.norm(c - (unit @ c)[..., None] * unit, axis=-1)
    assert mask[miss_distance < radius - 1e-6].all()
    assert not mask[miss_distance > radius + 1e-6].any()
    assert mask.sum() > 100


def test_floor_is_flat_at_its_height_and_ends_at_its_far_edge():
    size = 64
    scene = Scene([], floor_y=-1.2, pitch=0.0, floor_far=12.0)
    render = raycast.render_scene(scene, size)
    floor = render["segmentation"] == FLOOR
    rays = _rays(size)
    reaches = (rays[..., 1] < 0) & (scene.floor_y / rays[..., 1] * rays[..., 2] <= scene.floor_far)
    np.testing.assert_array_equal(floor, reaches)
    assert floor[-1].all() and not floor[0].any()  # floor at the bottom, sky at the top
    np.testing.assert_allclose(_points(render, size)[floor][:, 1], scene.floor_y, atol=1e-5)
    up = np.broadcast_to([0.0, 1.0, 0.0], (floor.sum(), 3))
    np.testing.assert_allclose(render["normal"][floor], up, atol=1e-6)


def test_tilted_camera_sees_the_floor_normal_tilted_and_its_points_at_floor_height():
    size, pitch = 48, math.radians(12.0)
    render = raycast.render_scene(Scene([], floor_y=-1.0, pitch=pitch), size)
    floor = render["segmentation"] == FLOOR
    assert floor.any()
    # The camera looks down by `pitch`: in its coordinates the world's up is (0, cos, -sin).
    up = np.array([0.0, math.cos(pitch), -math.sin(pitch)])
    np.testing.assert_allclose(render["normal"][floor], np.broadcast_to(up, (floor.sum(), 3)), atol=1e-6)
    points = _points(render, size)[floor]
    world_y = points[:, 1] * math.cos(pitch) - points[:, 2] * math.sin(pitch)
    np.testing.assert_allclose(world_y, -1.0, atol=1e-4)
    # Tilting down lowers the horizon: more floor than with a level camera.
    level = raycast.render_scene(Scene([], floor_y=-1.0), size)["segmentation"] == FLOOR
    assert floor.sum() > level.sum()


def test_box_pixels_lie_on_a_face_and_carry_that_face_normal():
    size = 64
    center, half, yaw = np.array([0.3, -0.4, 6.0]), np.array([0.6, 0.6, 0.5]), 0.5
    render = raycast.render_scene(Scene([Box(tuple(center), tuple(half), yaw)], floor_y=-1.0), size)
    mask = render["segmentation"] == BOX
    assert mask.sum() > 50
    c, s = math.cos(yaw), math.sin(yaw)
    to_world = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])  # columns: the box's axes
    local = (_points(render, size)[mask] - center) @ to_world
    normals = render["normal"][mask].astype(np.float64)
    face_normals = np.concatenate([to_world.T, -to_world.T])
    match = np.abs(normals @ face_normals.T - 1) < 1e-5
    assert (match.sum(axis=1) == 1).all()
    face = match.argmax(axis=1)
    axis, sign = face % 3, np.where(face < 3, 1.0, -1.0)
    rows = np.arange(len(local))
    np.testing.assert_allclose(local[rows, axis], sign * half[axis], atol=1e-4)
    assert (np.abs(local) <= half + 1e-4).all()
    assert len(np.unique(face)) >= 2  # sees two faces at least (turned box, seen from above)


def test_cylinder_side_and_top_cap_are_exact():
    size = 64
    base, radius, height = np.array([-0.5, -1.0, 5.0]), 0.6, 0.7
    # Floating above a low floor, so that its bottom edge shows against the floor.
    render = raycast.render_scene(Scene([Cylinder(tuple(base), radius, height)], floor_y=-3.0), size)
    mask = render["segmentation"] == CYLINDER
    points, normals = _points(render, size)[mask], render["normal"][mask]
    radial = points[:, [0, 2]] - base[[0, 2]]
    cap = np.abs(normals[:, 1] - 1) < 1e-6
    assert cap.sum() > 10 and (~cap).sum() > 10  # the camera is above the top: it sees the cap and the side
    side = ~cap
    np.testing.assert_allclose(normals[side, 1], 0.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(radial[side], axis=1), radius, atol=1e-3)
    np.testing.assert_allclose(normals[side][:, [0, 2]], radial[side] / radius, atol=1e-3)
    assert (points[side, 1] >= base[1] - 1e-4).all() and (points[side, 1] <= base[1] + height + 1e-4).all()
    np.testing.assert_allclose(points[cap, 1], base[1] + height, atol=1e-4)
    assert (np.linalg.norm(radial[cap], axis=1) <= radius + 1e-4).all()


@pytest.mark.parametrize("near_first", [True, False])
def test_the_nearest_hit_wins_whatever_the_object_order(near_first):
    near, far = Sphere((0.0, 0.0, 5.0), 0.5, hsv=(0.05, 1.0, 1.0)), Box((0.0, 0.0, 8.0), (1.5, 1.5, 0.5))
    objects = [near, far] if near_first else [far, near]
    scene = Scene(objects, floor_y=-1.5)
    render = raycast.render_scene(scene, 65)
    assert render["segmentation"][32, 32] == SPHERE
    assert render["depth"][32, 32] == pytest.approx(4.5, abs=1e-5)
    assert render["object_index"][32, 32] == objects.index(near)
    assert render["segmentation"][32, 25] == BOX
    assert render["depth"][32, 25] == pytest.approx(7.5, abs=1e-5)
    far_index = objects.index(far)
    assert render["ray_hits"][far_index] > (render["object_index"] == far_index).sum()
    attributes = dict(zip(shapes.ATTRIBUTE_NAMES, shapes._attributes(scene, render)))
    assert attributes["has_sphere"] == 1 and attributes["has_box"] == 1 and attributes["has_cylinder"] == 0
    assert attributes["occluded_object"] == 1 and attributes["warm_colored_object"] == 1
    assert attributes["three_or_more_objects"] == 0 and attributes["large_object"] == 1


def test_an_object_out_of_view_is_not_visible_and_not_occluded():
    scene = Scene([Sphere((0.0, 0.0, -5.0), 1.0, hsv=(0.0, 1.0, 1.0))], floor_y=-1.0)  # behind the camera
    render = raycast.render_scene(scene, 32)
    assert (render["segmentation"] != SPHERE).all() and render["ray_hits"][0] == 0
    assert not shapes._attributes(scene, render).any()


@pytest.mark.parametrize("third_in_view", [True, False])
def test_objects_are_counted_only_when_visible(third_in_view):
    third = Cylinder((1.5, -1.0, 6.0) if third_in_view else (1.5, -1.0, -6.0), 0.4, 1.0, hsv=(0.5, 1.0, 1.0))
    sphere, box = Sphere((-1.5, -0.5, 6.0), 0.5, hsv=(0.5, 1.0, 1.0)), Box((0.0, -0.5, 6.0), (0.5, 0.5, 0.5))
    objects = [sphere, box, third]
    scene = Scene(objects, floor_y=-1.0)
    attributes = dict(zip(shapes.ATTRIBUTE_NAMES, shapes._attributes(scene, raycast.render_scene(scene, 64))))
    assert attributes["has_cylinder"] == attributes["three_or_more_objects"] == int(third_in_view)
    assert attributes["has_sphere"] == attributes["has_box"] == 1
    assert attributes["warm_colored_object"] == attributes["occluded_object"] == 0
    assert attributes["large_object"] == 0


# --- the generated data set --------------------------------------------------------------------


def test_attribute_frequencies_are_balanced(sample):
    frequencies = dict(zip(shapes.ATTRIBUTE_NAMES, sample["attributes"].mean(axis=0)))
    assert all(0.2 <= f <= 0.8 for f in frequencies.values()), frequencies


def test_attributes_agree_with_the_segmentation(sample):
    seg, attributes = sample["segmentation"], sample["attributes"]
    min_pixels = round(shapes.MIN_VISIBLE_FRACTION * 64 * 64)
    for name, label in (("has_sphere", SPHERE), ("has_box", BOX), ("has_cylinder", CYLINDER)):
        pixels = (seg == label).sum(axis=(1, 2))
        present = attributes[:, shapes.ATTRIBUTE_NAMES.index(name)] == 1
        assert (pixels[present] >= min_pixels).all()
        assert not present[pixels == 0].any()
    large = attributes[:, shapes.ATTRIBUTE_NAMES.index("large_object")] == 1
    object_pixels = (seg > FLOOR).sum(axis=(1, 2))
    assert (object_pixels[large] > shapes.LARGE_OBJECT_FRACTION * 64 * 64).all()


def test_every_class_and_the_sky_appear_in_200_images(sample):
    seg = sample["segmentation"][:200]
    shares = np.bincount(seg.ravel() + 1, minlength=len(shapes.CLASS_NAMES) + 1) / seg.size
    assert (shares > 0.01).all(), shares  # sky, floor, sphere, box, cylinder


def test_colour_does_not_give_away_the_class(sample):
    # Random hues: the three object classes' average pixel colours are close to one another.
    image, seg = sample["image"].astype(np.float64), sample["segmentation"]
    means = np.array([image[seg == label].mean(axis=0) for label in (SPHERE, BOX, CYLINDER)])
    assert np.abs(means - means.mean(axis=0)).max() < 20
