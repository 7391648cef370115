"""Drawing primitives of the synthetic datasets: shape membership, textures, colours, clutter.

Pure numpy functions of a ``np.random.Generator`` and pixel coordinates; the scene generators in
:mod:`ccnn_jax.data.synthetic` compose them.
"""

from __future__ import annotations

import functools

import numpy as np

SHAPES = ("disk", "square", "triangle", "star", "cross", "ring", "crescent", "bar")
"""Object shapes (the synthetic dataset's object classes, in class order 1..8)."""

TEXTURES = ("plain", "gradient", "stripes", "checker", "blotches", "dots")
"""Textures for objects and ordinary backgrounds."""

SMOOTH_TEXTURES = ("plain", "gradient")
"""The textures of the easy look (no internal edges)."""


def _polygon_inside(u, v, radii, offset=0.0):
    """Inside test for a star-shaped polygon with vertices at radii[k], angle offset + 2*pi*k/n."""
    radii = np.asarray(radii, np.float64)
    n = radii.size
    ang = offset + 2 * np.pi * np.arange(n) / n
    vx, vy = radii * np.cos(ang), radii * np.sin(ang)
    phi = np.mod(np.arctan2(v, u) - offset, 2 * np.pi)
    k = np.minimum((phi / (2 * np.pi / n)).astype(np.int64), n - 1)
    k2 = (k + 1) % n
    x1, y1, x2, y2 = vx[k], vy[k], vx[k2], vy[k2]
    return (x2 - x1) * (v - y1) - (y2 - y1) * (u - x1) >= 0


def shape_inside(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean membership of local coordinates (u, v) (object radius = 1) in shape ``name``."""
    rho2 = u * u + v * v
    if name == "disk":
        return rho2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":
        return _polygon_inside(u, v, [1.05] * 3, np.pi / 2)
    if name == "star":
        return _polygon_inside(u, v, [1.05, 0.42] * 5, np.pi / 2)
    if name == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.3) & (b <= 0.95)) | ((b <= 0.3) & (a <= 0.95))
    if name == "ring":
        return (rho2 <= 1.0) & (rho2 >= 0.55**2)
    if name == "crescent":
        return (rho2 <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)
    if name == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.28)
    raise ValueError(f"shape name: expected one of {SHAPES}, got {name!r}")


@functools.cache
def unit_area(name: str) -> float:
    """Area of shape ``name`` at radius 1 (numerical, 1000x1000 grid on [-1.1, 1.1]^2)."""
    g = (np.arange(1000) + 0.5) / 1000 * 2.2 - 1.1
    u, v = np.meshgrid(g, g)
    return float(shape_inside(name, u, v).mean() * 2.2**2)


def texture(rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A blend field t in [0, 1] of shape yy.shape (pixel coordinates yy, xx, scaled to [0, 1])."""
    th = rng.uniform(0, np.pi)
    c, s = np.cos(th), np.sin(th)
    along = c * xx + s * yy
    if kind == "plain":
        return np.zeros_like(xx)
    if kind == "gradient":
        return np.clip(along / np.sqrt(2) + 0.5 - 0.5 * (c + s) / np.sqrt(2), 0, 1)
    if kind == "stripes":
        f = rng.uniform(4, 12)
        return (np.sin(2 * np.pi * f * along + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float64)
    if kind == "checker":
        f = rng.uniform(3, 8)
        across = -s * xx + c * yy
        return ((np.floor(f * along) + np.floor(f * across)) % 2).astype(np.float64)
    if kind == "blotches":
        n = int(rng.integers(3, 7))
        grid = rng.uniform(0, 1, (n + 1, n + 1))
        gy, gx = yy * n, xx * n
        iy, ix = np.clip(gy.astype(int), 0, n - 1), np.clip(gx.astype(int), 0, n - 1)
        fy, fx = gy - iy, gx - ix
        val = (
            grid[iy, ix] * (1 - fy) * (1 - fx)
            + grid[iy + 1, ix] * fy * (1 - fx)
            + grid[iy, ix + 1] * (1 - fy) * fx
            + grid[iy + 1, ix + 1] * fy * fx
        )
        return np.clip((val - 0.5) * 3 + 0.5, 0, 1)
    if kind == "dots":
        f = rng.uniform(4, 9)
        ox, oy = rng.uniform(0, 1, 2)
        dx = np.mod(f * xx + ox, 1) - 0.5
        dy = np.mod(f * yy + oy, 1) - 0.5
        return (dx * dx + dy * dy < 0.09).astype(np.float64)
    if kind == "waves":
        f, g = rng.uniform(5, 9), rng.uniform(1.5, 3)
        wob = 0.06 * np.sin(2 * np.pi * g * xx + rng.uniform(0, 2 * np.pi))
        return 0.5 + 0.5 * np.sin(2 * np.pi * f * (yy + wob) + rng.uniform(0, 2 * np.pi))
    if kind == "speckle":
        return (rng.uniform(0, 1, xx.shape) < 0.08).astype(np.float64)
    raise ValueError(f"texture kind: unknown {kind!r}")


def colours(rng: np.random.Generator) -> np.ndarray:
    """Two colours (2, 3) for a texture: a random base, a contrasting second one, random gain."""
    c1 = rng.uniform(0, 1, 3)
    c2 = np.clip(c1 + (2 * rng.integers(0, 2, 3) - 1) * rng.uniform(0.2, 0.6, 3), 0, 1)
    gain = rng.uniform(0.6, 1.2)
    return np.clip(np.stack([c1, c2]) * gain, 0, 1).astype(np.float32)


def paint(colours_2x3: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(..., 3) image blending colours[0] (t = 0) and colours[1] (t = 1)."""
    t = t[..., None].astype(np.float32)
    return colours_2x3[0] + (colours_2x3[1] - colours_2x3[0]) * t


@functools.cache
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (yy, xx) pixel-centre coordinates in [0, 1], each (size, size) float32."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def add_clutter(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray):
    """Paint 2-5 thin random line segments (background clutter) onto img in place."""
    n = int(rng.integers(2, 6))
    p = rng.uniform(0, 1, (n, 2, 1, 1)).astype(np.float32)
    th = rng.uniform(0, np.pi, (n, 1, 1))
    dx, dy = np.cos(th).astype(np.float32), np.sin(th).astype(np.float32)
    half = rng.uniform(0.2, 0.5, (n, 1, 1)).astype(np.float32)
    width = rng.uniform(0.4, 0.8, (n, 1, 1)) / xx.shape[1]
    colour = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    rel_x, rel_y = xx - p[:, 0], yy - p[:, 1]
    t = np.clip(rel_x * dx + rel_y * dy, -half, half)
    on_line = (rel_x - t * dx) ** 2 + (rel_y - t * dy) ** 2 < width**2  # (n, H, W)
    for i in range(n):
        img[on_line[i]] = colour[i]


def outer_band(zmap: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` 4-neighbour steps of a pixel with a higher z-order (an occluder)."""
    band = np.zeros(zmap.shape, bool)
    cur = zmap.copy()
    for _ in range(width):
        nb = cur.copy()
        nb[1:] = np.maximum(nb[1:], cur[:-1])
        nb[:-1] = np.maximum(nb[:-1], cur[1:])
        nb[:, 1:] = np.maximum(nb[:, 1:], cur[:, :-1])
        nb[:, :-1] = np.maximum(nb[:, :-1], cur[:, 1:])
        band |= nb > zmap
        cur = nb
    return band
