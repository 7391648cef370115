r"""``ccnn_synthetic/streets``: CamVid-like street scenes, every pixel one of 11 region classes.

The classes are CamVid's 11 (SegNet order, :data:`CLASS_NAMES`); there is no background class.
A scene is laid out in one-point perspective around a horizon ``h0`` and a vanishing point
``v`` (unit image coordinates, y down): with the depth scale of a ground row
:math:`s(y) = (y - h_0) / (1 - h_0)`, the road is :math:`x_L(y) < x < x_R(y)` below the
horizon, the sidewalks lie between the road edges and the building base lines (all lines through
the vanishing point), facades (buildings, or a wall of trees) stand above the base lines up to
rooflines that also converge to the vanishing point, and the sky fills the rest. Objects stand on
the ground and scale with :math:`s`: trees, poles (1-2 pixels wide) with signs on top,
pedestrians on the sidewalks, cars and bicyclists on the road, fences along the facades. They
are painted far to near, so nearer ones occlude farther ones.

Appearance never names the class by colour: every region draws its two colours from the same
distribution whatever its class, and a random per-image gain and tint scale them, so a region's
mean colour carries no information about its class (``tests/test_streets.py`` checks that a
nearest-class-mean-colour classifier over regions is near chance). What identifies a class is
its texture (windows, foliage, asphalt with lane marks, paving, slats, smooth sky), its shape
(thin poles, a sign's disc or triangle, a car's cabin and wheels, a person's head and legs), its
position (sky above, road below) and its context (signs on poles, cars on the road).

Void: one pixel (``void_width``) outside the boundary of every region that is painted over
another (on the side of the region behind), as in the shapes scenes.

Every example is a pure function of ``(seed, split, index)`` (:func:`generate_scene`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ccnn_jax.data import common, shapes, synthetic

CLASS_NAMES = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian",
    "bicyclist",
)  # fmt: skip
"""CamVid's 11 classes in the SegNet order (class 0 is ``sky``: there is no background)."""

(SKY, BUILDING, POLE, ROAD, SIDEWALK, TREE, SIGN, FENCE, CAR, PEDESTRIAN,
 BICYCLIST) = range(len(CLASS_NAMES))  # fmt: skip

PRESENCE = {"tree": 0.85, "pole": 0.95, "fence": 0.6, "car": 0.85, "pedestrian": 0.8,
            "bicyclist": 0.5}  # fmt: skip
"""P(at least one object of the kind is placed in an image); signs sit on 60% of the poles."""


MAX_ROLL = 0.2
"""Largest camera roll (radians, ~11 degrees): a tilted horizon makes position predict less."""


@dataclasses.dataclass(frozen=True)
class StreetScene:
    """One generated street example.

    Attributes:
      image: uint8 (H, W, 3).
      mask: uint8 (H, W), class index or 255 (void).
      regions: int16 (H, W), index of the painted region at each pixel (void not applied).
      region_classes: class of each region (``regions == j`` has class ``region_classes[j]``).
      labels: sorted classes present in ``mask`` (void excluded).
      large: sorted classes covering > 10% of the image in ``mask``.
    """

    image: np.ndarray
    mask: np.ndarray
    regions: np.ndarray
    region_classes: tuple[int, ...]
    labels: list[int]
    large: list[int]


class _Canvas:
    """Painter's-algorithm canvas: each :meth:`paint` adds a region on top of the earlier ones."""

    def __init__(self, size: int, rng: np.random.Generator, roll: float = 0.0):
        self.rng = rng
        self.grid_yy, self.grid_xx = shapes.pixel_grid(size)
        # scene coordinates: the pixel grid rotated by the camera's roll about the centre
        cos, sin = np.float32(np.cos(roll)), np.float32(np.sin(roll))
        dy, dx = self.grid_yy - 0.5, self.grid_xx - 0.5
        self.yy, self.xx = 0.5 + cos * dy - sin * dx, 0.5 + sin * dy + cos * dx
        self.image = np.zeros((size, size, 3), np.float32)
        self.regions = np.zeros((size, size), np.int16)
        self.classes: list[int] = []
        self.px = 1.0 / size  # one pixel in unit coordinates

    def colours(self) -> np.ndarray:
        """Two colours (2, 3) with some contrast, drawn the same way for every class."""
        c1 = self.rng.uniform(0.05, 0.95, 3)
        for _ in range(10):
            c2 = self.rng.uniform(0.05, 0.95, 3)
            if np.abs(c2 - c1).sum() > 0.45:
                break
        return np.stack([c1, c2]).astype(np.float32)

    def paint(self, cls: int, inside: np.ndarray, blend: np.ndarray | float = 0.0) -> None:
        """Adds region ``inside`` of class ``cls``, coloured by blending its two colours."""
        if not inside.any():
            return
        colours = self.colours()
        t = np.broadcast_to(np.asarray(blend, np.float32), inside.shape)[inside][:, None]
        self.image[inside] = colours[0] + (colours[1] - colours[0]) * t
        self.classes.append(cls)
        self.regions[inside] = len(self.classes)

    def smooth_noise(self, cells: float) -> np.ndarray:
        """A field in [0, 1] of random values on a ``cells``-per-unit grid, bilinearly blended."""
        n = max(int(np.ceil(cells)), 1)
        grid = self.rng.uniform(0, 1, (n + 2, n + 2))
        gy = self.grid_yy * n + self.rng.uniform(0, 1)
        gx = self.grid_xx * n + self.rng.uniform(0, 1)
        iy, ix = gy.astype(int), gx.astype(int)
        fy, fx = gy - iy, gx - ix
        return (grid[iy, ix] * (1 - fy) * (1 - fx) + grid[iy + 1, ix] * fy * (1 - fx)
                + grid[iy, ix + 1] * (1 - fy) * fx + grid[iy + 1, ix + 1] * fy * fx)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Street:
    """The perspective layout: horizon, vanishing point and ground lines (x at the bottom row)."""

    h0: float
    v: float
    road_left: float
    road_right: float
    base_left: float
    base_right: float

    def depth(self, y):
        """Depth scale s(y) in (0, 1] of a ground row (0 at the horizon, 1 at the bottom)."""
        return np.clip((y - self.h0) / (1.0 - self.h0), 1e-3, 1.0)

    def line_x(self, bottom_x: float, y):
        """x of the ground line from the vanishing point to ``bottom_x`` on the bottom row."""
        return self.v + (bottom_x - self.v) * self.depth(y)

    def base_y(self, x):
        """Bottom of the facade at column x (where the base line on x's side crosses it)."""
        bottom = np.where(x < self.v, self.base_left, self.base_right)
        s = np.clip((x - self.v) / (bottom - self.v), 0.0, 1.0)
        return self.h0 + s * (1.0 - self.h0)

    def ground_point(self, rng, where: str) -> tuple[float, float]:
        """A random (x, y) on the ``road``, the ``sidewalk`` or the road's ``edge``."""
        y = self.h0 + (1.0 - self.h0) * rng.uniform(0.3, 1.0) ** 0.7
        left = rng.uniform() < 0.5
        road_x = self.line_x(self.road_left if left else self.road_right, y)
        base_x = self.line_x(self.base_left if left else self.base_right, y)
        if where == "road":
            t = rng.uniform(0.15, 0.85)
            return self.line_x(self.road_left, y) * (1 - t) + self.line_x(self.road_right, y) * t, y
        if where == "edge":
            return road_x + (1 if left else -1) * rng.uniform(0.02, 0.08) * self.depth(y), y
        t = rng.uniform(0.1, 0.9)  # on the visible part of the sidewalk
        return road_x * (1 - t) + np.clip(base_x, 0.02, 0.98) * t, y


def _layout(rng: np.random.Generator) -> _Street:
    v = rng.uniform(0.2, 0.8)
    road_left, road_right = rng.uniform(-0.2, 0.25), rng.uniform(0.75, 1.2)
    return _Street(
        h0=rng.uniform(0.28, 0.6), v=v, road_left=road_left, road_right=road_right,
        base_left=road_left - rng.uniform(0.4, 1.2), base_right=road_right + rng.uniform(0.4, 1.2),
    )  # fmt: skip


def _frac(x):
    return x - np.floor(x)


def _paint_ground(c: _Canvas, st: _Street) -> None:
    yy, xx, rng = c.yy, c.xx, c.rng
    below = yy > st.h0
    x_rl, x_rr = st.line_x(st.road_left, yy), st.line_x(st.road_right, yy)
    s = st.depth(yy)
    for bottom, road_x, sign in ((st.base_left, x_rl, -1), (st.base_right, x_rr, 1)):
        base_x = st.line_x(bottom, yy)
        inside = below & (sign * (xx - road_x) >= 0) & (sign * (xx - base_x) < 0)
        f = rng.uniform(5, 9)  # paving: a tile grid whose rows follow the depth
        tiles = (_frac(f * (xx - st.v) / s) < 0.2) | (_frac(2.5 / s) < 0.2)
        c.paint(SIDEWALK, inside, tiles)
    road = below & (xx > x_rl) & (xx < x_rr)
    asphalt = 0.35 * rng.uniform(0, 1, xx.shape)
    centre = st.line_x(rng.uniform(0.35, 0.65) * (st.road_right - st.road_left) + st.road_left, yy)
    dashes = (np.abs(xx - centre) < 0.012 * s + 0.4 * c.px) & (_frac(1.2 / s) < 0.5)
    c.paint(ROAD, road, np.where(dashes, 1.0, asphalt))


def _paint_facades(c: _Canvas, st: _Street) -> None:
    """Buildings (windows) or tree walls (foliage) on each side, above the base lines."""
    yy, xx, rng = c.yy, c.xx, c.rng
    base = st.base_y(xx)
    for left in (True, False):
        cuts = np.sort(rng.uniform(0, 1, int(rng.integers(1, 4))))
        edges = np.concatenate([[0.0], cuts, [1.0]])
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            lo, hi = (
                (a * st.v, b * st.v) if left else (st.v + a * (1 - st.v), st.v + b * (1 - st.v))
            )
            far = (st.v - xx) / st.v if left else (xx - st.v) / (1 - st.v)  # 1 at the border
            height = rng.uniform(0.15, 0.5) * (1.0 - rng.uniform(0, 0.6) * (1 - far))
            roof = st.h0 - height * far
            lo, hi = (-1.0 if left and a == 0 else lo), (2.0 if not left and b == 1 else hi)
            inside = (xx >= lo) & (xx < hi) & (yy < base) & (yy >= roof)
            if rng.uniform() < 0.8:
                fx, fy = rng.uniform(10, 20), rng.uniform(8, 16)
                windows = (_frac(fx * xx) > rng.uniform(0.3, 0.55)) & (_frac(fy * yy) > 0.45)
                c.paint(BUILDING, inside, windows)
            else:
                canopy = roof - 0.08 * far * c.smooth_noise(12)
                c.paint(TREE, (xx >= lo) & (xx < hi) & (yy < base) & (yy >= canopy),
                        c.smooth_noise(rng.uniform(14, 22)))  # fmt: skip
    if rng.uniform() < PRESENCE["fence"]:
        left = rng.uniform() < 0.5
        a = rng.uniform(0, 0.5)
        b = a + rng.uniform(0.3, 0.5)
        lo, hi = (a * st.v, b * st.v) if left else (st.v + a * (1 - st.v), st.v + b * (1 - st.v))
        s = st.depth(base)
        inside = (
            (xx >= lo)
            & (xx < hi)
            & (yy < base)
            & (yy >= base - rng.uniform(0.25, 0.4) * s - 2 * c.px)
        )
        slats = _frac(rng.uniform(25, 40) * xx) < 0.5
        c.paint(FENCE, inside, slats | (_frac((base - yy) / (0.05 * np.maximum(s, 0.05))) < 0.2))


def _disk(c, x, y, r):
    return (c.xx - x) ** 2 + (c.yy - y) ** 2 <= r * r


def _rect(c, x0, x1, y0, y1):
    return (c.xx >= x0) & (c.xx < x1) & (c.yy >= y0) & (c.yy < y1)


def _tree(c, x, y, s):
    trunk_w = max(0.02 * s, 1.2 * c.px)
    top = y - s * c.rng.uniform(0.35, 0.6)
    r = s * c.rng.uniform(0.08, 0.14)
    canopy = np.zeros_like(c.xx, bool)
    for _ in range(int(c.rng.integers(3, 7))):
        canopy |= _disk(
            c, x + c.rng.normal(0, r), top + c.rng.normal(0, 0.6 * r), r * c.rng.uniform(0.6, 1.0)
        )
    trunk = _rect(c, x - trunk_w / 2, x + trunk_w / 2, top, y)
    c.paint(TREE, canopy | trunk, np.where(canopy, c.smooth_noise(c.rng.uniform(16, 24)), 0.0))


def _pole(c, x, y, s):
    width = max(0.03 * s, 2.0 * c.px)
    top = y - s * c.rng.uniform(0.4, 0.65)
    c.paint(POLE, _rect(c, x - width / 2, x + width / 2, top, y), c.yy - top)
    if c.rng.uniform() < 0.7:
        r = max(0.07 * s, 2.5 * c.px)
        u, w = (c.xx - x) / r, (c.yy - top) / r
        kind = c.rng.integers(3)
        if kind == 0:  # disc with a rim
            rho = np.sqrt(u * u + w * w)
            c.paint(SIGN, rho <= 1, rho > 0.6)
        elif kind == 1:  # triangle pointing down
            inside = (w >= -0.8) & (w <= 0.9) & (np.abs(u) <= 0.9 * (0.9 - w) / 1.7 + 0.05)
            c.paint(SIGN, inside, w < -0.4)
        else:  # rectangle plate
            inside = (np.abs(u) <= 1.2) & (np.abs(w) <= 0.8)
            c.paint(SIGN, inside, (np.abs(u) > 0.8) | (np.abs(w) > 0.45))


def _pedestrian(c, x, y, s):
    h = s * c.rng.uniform(0.3, 0.45)
    w = h * c.rng.uniform(0.22, 0.3)
    head = _disk(c, x, y - 0.88 * h, 0.11 * h + 0.3 * c.px)
    torso = ((c.xx - x) / (w / 2)) ** 2 + ((c.yy - (y - 0.6 * h)) / (0.22 * h)) ** 2 <= 1
    legs = _rect(c, x - 0.35 * w, x + 0.35 * w, y - 0.45 * h, y) & (np.abs(c.xx - x) > 0.07 * w)
    c.paint(PEDESTRIAN, head | torso | legs, legs)


def _car(c, x, y, s):
    w = s * c.rng.uniform(0.3, 0.45)
    h = w * c.rng.uniform(0.5, 0.65)
    body = _rect(c, x - w / 2, x + w / 2, y - 0.6 * h, y - 0.12 * h)
    cab_top, cab_bottom = y - h, y - 0.6 * h
    taper = (c.yy - cab_top) / max(cab_bottom - cab_top, 1e-6)
    cabin = (c.yy >= cab_top) & (c.yy < cab_bottom) & (np.abs(c.xx - x) <= w * (0.3 + 0.12 * taper))
    wheels = _disk(c, x - 0.3 * w, y - 0.13 * h, 0.13 * w) | _disk(
        c, x + 0.3 * w, y - 0.13 * h, 0.13 * w
    )
    windows = cabin & (np.abs(c.xx - x) <= w * (0.24 + 0.12 * taper)) & (c.yy > cab_top + 0.06 * h)
    c.paint(CAR, body | cabin | wheels, np.where(windows | wheels, 1.0, 0.0))


def _bicyclist(c, x, y, s):
    h = s * c.rng.uniform(0.35, 0.45)
    r = 0.2 * h
    ring = np.zeros_like(c.xx, bool)
    for dx in (-1.1 * r, 1.1 * r):
        d = np.sqrt((c.xx - x - dx) ** 2 + (c.yy - y + r) ** 2)
        ring |= (d <= r) & (d >= r - max(0.25 * r, 0.9 * c.px))
    frame = _rect(c, x - 1.1 * r, x + 1.1 * r, y - r - 0.6 * c.px, y - r + 0.6 * c.px)
    torso = _rect(c, x - 0.12 * h, x + 0.12 * h, y - 0.85 * h, y - 0.4 * h)
    head = _disk(c, x, y - 0.92 * h, 0.1 * h + 0.3 * c.px)
    c.paint(BICYCLIST, ring | frame | torso | head, torso | head)


def _near_other_class(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` 4-neighbour steps of a pixel of another class."""
    near = np.zeros(mask.shape, bool)
    for axis in (0, 1):
        for shift in range(1, width + 1):
            for sign in (1, -1):
                other = np.roll(mask, sign * shift, axis=axis) != mask
                edge = [slice(None)] * 2
                edge[axis] = slice(0, shift) if sign > 0 else slice(-shift, None)
                other[tuple(edge)] = False  # np.roll wraps around: no neighbour there
                near |= other
    return near


_OBJECTS = (("tree", _tree, "sidewalk", 3), ("pole", _pole, "edge", 4),
            ("pedestrian", _pedestrian, "sidewalk", 4), ("car", _car, "road", 3),
            ("bicyclist", _bicyclist, "edge", 2))  # fmt: skip


def generate_scene(
    seed: int, split: str, index: int, config: synthetic.SyntheticConfig | None = None
) -> StreetScene:
    """Generates street example ``index`` of ``split`` (deterministic in (seed, split, index))."""
    config = config or synthetic.SyntheticConfig(name="streets", scene="streets")
    size = int(config.image_size)
    if size < 16:
        raise ValueError(f"config.image_size: expected >= 16 for street scenes, got {size}")
    rng = synthetic._rng(seed, split, index)
    c = _Canvas(size, rng, roll=rng.uniform(-MAX_ROLL, MAX_ROLL))
    st = _layout(rng)
    c.paint(SKY, np.ones_like(c.xx, bool), np.clip(c.yy / st.h0 + 0.3 * c.smooth_noise(3), 0, 1))
    _paint_facades(c, st)
    _paint_ground(c, st)
    objects = []
    for kind, draw, where, most in _OBJECTS:
        if rng.uniform() < PRESENCE[kind]:
            for _ in range(int(rng.integers(1, most + 1))):
                x, y = st.ground_point(rng, where)
                objects.append((y, len(objects), draw, x))
    for y, _, draw, x in sorted(objects):  # far to near
        draw(c, x, y, float(st.depth(y)))

    gain = rng.uniform(0.6, 1.15) * rng.uniform(0.85, 1.15, 3)  # per-image brightness and tint
    img = c.image * gain.astype(np.float32)
    img = np.clip(img + 0.03 * rng.standard_normal(img.shape, dtype=np.float32), 0, 1)
    image = np.round(img * 255).astype(np.uint8)
    lut = np.array([SKY, *c.classes], np.uint8)  # region 0 is never left (the sky covers all)
    mask = lut[c.regions]
    if config.void_width > 0:
        band = shapes.outer_band(c.regions, int(config.void_width))
        mask[band & _near_other_class(mask, int(config.void_width))] = common.VOID
    labels = common.labels_in_mask(mask, len(CLASS_NAMES))
    counts = np.bincount(mask.ravel(), minlength=256)
    large = [k for k in labels if counts[k] > common.LARGE_FRACTION * size * size]
    return StreetScene(image, mask, c.regions - 1, tuple(c.classes), labels, large)
