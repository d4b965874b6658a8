"""A deterministic procedural face dataset in the DigiFace-1M layout.

``make_sample_dataset(root)`` writes ``root/<identity>/<k>.png`` (112x112 RGB, ArcFace-112
aligned, numeric identity folders as in DigiFace-1M) for demos and tests that need face-like
data without downloading anything. ``render_face`` draws one image in memory, ``render_pair``
both looks of one scene, ``face_landmarks`` gives its five landmarks.

Every image comes from one scene per (seed, identity, k): identity traits (face shape, eyes,
nose, mouth, brows, skin tone, hair colour and style, beard, glasses, freckles) and per-image
variation (pose, expression, lighting, background). The scene is drawn in two looks of the
same world, so the two styles of one (seed, identity, k) are pixel-aligned pairs:

- ``render``: flat banded shading, hard edges, saturated uniform colours (a 3D-render look);
- ``photo``: soft shading from the light direction with a highlight, skin and hair texture,
  slight blur, a colour cast, sensor noise and JPEG artefacts.

Random numbers come from numpy Philox generators keyed by (seed, stream, identity, k) only,
so the output is byte-identical across runs and independent of worker scheduling.
"""
from __future__ import annotations

import colorsys
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import cv2
import numpy as np

from rtkit.engines.errors import RtkitError

# Five-point ArcFace template of 112x112 crops, (x, y): eyes, nose tip, mouth corners.
ARCFACE_112_LANDMARKS = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32)

STYLES = ("render", "photo")

_SUPERSAMPLE = 2  # labels are drawn at 2x and area-downsampled: anti-aliased, still hard edges

# Random-stream tags keep identity, per-image and photo-look draws independent of each other.
_IDENTITY_STREAM, _SHOT_STREAM, _PHOTO_STREAM = 0, 1, 2


class Region(IntEnum):
    """Labels of the scene's region map; both looks colour the same map."""

    BACKGROUND = 0
    SKIN = 1
    NECK = 2
    EAR = 3
    HAIR = 4
    HAIR_SHADE = 5
    BROW = 6
    SCLERA = 7
    IRIS = 8
    PUPIL = 9
    LASH = 10
    NOSTRIL = 11
    CREASE = 12
    LIP = 13
    MOUTH = 14
    TEETH = 15
    BEARD = 16
    STUBBLE = 17
    GLASSES = 18
    FRECKLE = 19
    MOLE = 20
    GLINT = 21
    UPPER_LIP = 22


_N_REGIONS = len(Region)
_SKIN_LIKE = (Region.SKIN, Region.NECK, Region.EAR, Region.CREASE, Region.FRECKLE, Region.MOLE, Region.STUBBLE)
_HAIR_LIKE = (Region.HAIR, Region.HAIR_SHADE, Region.BROW, Region.BEARD)
# How much each region follows the light (1: fully shaded surface, 0: unlit).
_SHADED = np.ones(_N_REGIONS, np.float32)
_SHADED[[Region.BACKGROUND]] = 0.0
_SHADED[[Region.SCLERA, Region.IRIS, Region.PUPIL, Region.TEETH, Region.GLINT]] = 0.35
_SHADED[[Region.GLASSES, Region.MOUTH, Region.LASH]] = 0.5

HAIR_STYLES = ("buzz", "short", "side_part", "long", "bangs", "curly", "receding", "bald", "slicked")
BEARD_STYLES = ("none", "stubble", "full", "goatee", "moustache")

_SKIN_TONES = np.array([(250, 222, 200), (238, 196, 165), (222, 170, 130), (196, 140, 100),
                        (160, 108, 74), (122, 80, 54), (88, 58, 42)], np.float32) / 255
_HAIR_COLOURS = np.array([(22, 18, 16), (52, 36, 26), (92, 60, 36), (140, 100, 62), (212, 176, 116),
                          (132, 56, 28), (178, 84, 40), (140, 138, 134), (222, 220, 212)], np.float32) / 255
_HAIR_COLOUR_P = np.array([0.2, 0.2, 0.16, 0.1, 0.1, 0.06, 0.06, 0.07, 0.05])
_IRIS_COLOURS = np.array([(62, 38, 22), (104, 64, 30), (120, 100, 50), (70, 110, 70), (60, 100, 150),
                          (110, 126, 140)], np.float32) / 255


@dataclass(frozen=True)
class IdentityTraits:
    """What stays the same across one identity's images (canonical 112-pixel units)."""

    skin: np.ndarray          # RGB in [0, 1]
    hair_colour: np.ndarray
    iris_colour: np.ndarray
    lip_colour: np.ndarray
    hair_style: str
    hair_volume: float
    hairline: float           # y of the hairline at the middle of the forehead
    temple: float             # y of the hairline at the temples
    face_cy: float
    face_rx: float
    face_top: float           # forehead radius above face_cy
    face_chin: float          # chin distance below face_cy
    jaw_taper: float
    jaw_power: float
    eye_spread: float
    eye_dy: float
    eye_w: float
    eye_h: float
    eye_tilt: float           # degrees, outer corners up when positive
    iris_scale: float
    brow_gap: float
    brow_thick: float
    brow_arch: float
    brow_len: float
    brow_tilt: float
    nose_dy: float
    nose_w: float
    nose_height: float
    mouth_dy: float
    mouth_spread: float
    lip_upper: float
    lip_lower: float
    ear_size: float
    beard: str
    freckles: np.ndarray      # (n, 3): x, y, radius
    mole: tuple | None        # (x, y, radius)
    glasses: str              # "none", "round" or "square"
    glasses_colour: np.ndarray
    blush: float
    strand_phase: float


@dataclass(frozen=True)
class Shot:
    """What varies from image to image of one identity."""

    roll: float               # degrees
    shift: tuple
    scale: float
    yaw: float                # -1 .. 1, features shift right when positive
    pitch: float              # -1 .. 1, looking down when positive
    mouth_open: float
    smile: float
    brow_raise: float
    eye_open: float
    gaze: tuple
    light: np.ndarray         # unit vector (x right, y down, z towards the camera)
    light_intensity: float
    ambient: float
    light_tint: np.ndarray
    bg_kind: str
    bg_colours: np.ndarray    # (2, 3)
    bg_angle: float
    bg_split: float
    wears_glasses: bool


def _rng(seed: int, stream: int, identity: int, k: int = 0) -> np.random.Generator:
    """A Philox stream keyed by the four 32-bit fields (distinct keys give independent streams)."""
    key = (((seed << 32 | stream) << 32 | identity) << 32) | k
    return np.random.Generator(np.random.Philox(key=key))


@functools.lru_cache(maxsize=4096)
def identity_traits(identity: int, seed: int = 0) -> IdentityTraits:
    """The traits of one identity; a pure function of (seed, identity)."""
    r = _rng(seed, _IDENTITY_STREAM, identity)
    tone = r.uniform(0, len(_SKIN_TONES) - 1)
    i0 = int(tone)
    i1 = min(i0 + 1, len(_SKIN_TONES) - 1)
    skin = _SKIN_TONES[i0] * (1 - (tone - i0)) + _SKIN_TONES[i1] * (tone - i0)
    skin = np.clip(skin * r.uniform(0.94, 1.06, 3).astype(np.float32), 0, 1)
    hair = _HAIR_COLOURS[r.choice(len(_HAIR_COLOURS), p=_HAIR_COLOUR_P)]
    hair = np.clip(hair * r.uniform(0.85, 1.15, 3).astype(np.float32), 0, 1)
    iris = _IRIS_COLOURS[r.integers(len(_IRIS_COLOURS))] * r.uniform(0.85, 1.15)
    lip = np.clip(skin * np.array([0.86, 0.56, 0.56], np.float32) * r.uniform(0.85, 1.05)
                  + np.array([0.08, 0.0, 0.02], np.float32), 0, 1)
    style = HAIR_STYLES[r.integers(len(HAIR_STYLES))]
    hairline = r.uniform(17, 27)
    if style == "receding":
        hairline = r.uniform(8, 15)
    beard = BEARD_STYLES[r.choice(len(BEARD_STYLES), p=[0.6, 0.1, 0.12, 0.1, 0.08])]
    face_cy = r.uniform(56, 60)
    face_rx = r.uniform(36, 45)
    n_freckles = int(r.integers(18, 40)) if r.random() < 0.18 else 0
    fx = r.normal(0, 1, n_freckles) * 14
    freckles = np.stack([56 + fx + np.sign(fx) * 6, r.uniform(58, 78, n_freckles),
                         r.uniform(0.6, 1.0, n_freckles)], 1).astype(np.float32).reshape(-1, 3)
    mole = None
    if r.random() < 0.35:
        mole = (float(56 + r.choice([-1, 1]) * r.uniform(10, 26)), float(r.uniform(60, 98)), float(r.uniform(0.9, 1.5)))
    glasses = "none"
    if r.random() < 0.18:
        glasses = ("round", "square")[r.integers(2)]
    return IdentityTraits(
        skin=skin, hair_colour=hair, iris_colour=np.clip(iris, 0, 1).astype(np.float32), lip_colour=lip,
        hair_style=style, hair_volume=float(r.uniform(2, 8)), hairline=float(hairline),
        temple=float(r.uniform(34, 42)), face_cy=float(face_cy), face_rx=float(face_rx),
        face_top=float(r.uniform(46, 54)), face_chin=float(r.uniform(50, 57)),
        jaw_taper=float(r.uniform(0.05, 0.45)), jaw_power=float(r.uniform(1.3, 3.0)),
        eye_spread=float(r.uniform(-2.5, 2.5)), eye_dy=float(r.uniform(-1.8, 1.8)),
        eye_w=float(r.uniform(6.2, 8.6)), eye_h=float(r.uniform(2.4, 4.0)), eye_tilt=float(r.uniform(-9, 9)),
        iris_scale=float(r.uniform(0.95, 1.25)),
        brow_gap=float(r.uniform(7, 11)), brow_thick=float(r.uniform(1.6, 4.2)),
        brow_arch=float(r.uniform(0.5, 4.0)), brow_len=float(r.uniform(15, 21)),
        brow_tilt=float(r.uniform(-8, 10)),
        nose_dy=float(r.uniform(-2.5, 2.5)), nose_w=float(r.uniform(6, 10)), nose_height=float(r.uniform(8, 15)),
        mouth_dy=float(r.uniform(-2.5, 2.5)), mouth_spread=float(r.uniform(-3, 3)),
        lip_upper=float(r.uniform(1.8, 3.6)), lip_lower=float(r.uniform(2.6, 5.2)),
        ear_size=float(r.uniform(0.85, 1.2)), beard=beard, freckles=freckles, mole=mole,
        glasses=glasses, glasses_colour=r.uniform(0.02, 0.5, 3).astype(np.float32),
        blush=float(r.uniform(0, 0.6)), strand_phase=float(r.uniform(0, 2 * math.pi)))


def shot_variation(identity: int, k: int, seed: int = 0) -> Shot:
    """The per-image variation of image ``k`` of ``identity``; a pure function of (seed, identity, k)."""
    r = _rng(seed, _SHOT_STREAM, identity, k)
    az = r.uniform(0, 2 * math.pi)
    el = math.radians(r.uniform(25, 70))
    light = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az) * 0.8 - 0.2, math.sin(el)],
                     np.float32)
    light /= np.linalg.norm(light)
    hue = r.uniform(0, 1, 2)
    sat = r.uniform(0.08, 0.6, 2)
    val = r.uniform(0.24, 0.94, 2)
    bg = np.array([colorsys.hsv_to_rgb(h, sv, v) for h, sv, v in zip(hue, sat, val)], np.float32)
    mouth_open = float(r.uniform(0.15, 1.0)) if r.random() < 0.3 else 0.0
    eye_open = float(r.uniform(0.35, 0.7)) if r.random() < 0.1 else float(r.uniform(0.85, 1.1))
    return Shot(
        roll=float(np.clip(r.normal(0, 4), -9, 9)),
        shift=(float(np.clip(r.normal(0, 1.3), -3.5, 3.5)), float(np.clip(r.normal(0, 1.3), -3.5, 3.5))),
        scale=float(math.exp(np.clip(r.normal(0, 0.03), -0.07, 0.07))),
        yaw=float(r.uniform(-1, 1)), pitch=float(r.uniform(-1, 1)),
        mouth_open=mouth_open, smile=float(r.uniform(0, 1) ** 2), brow_raise=float(r.normal(0, 1.0)),
        eye_open=eye_open, gaze=(float(r.uniform(-1.2, 1.2)), float(r.uniform(-0.6, 0.6))),
        light=light, light_intensity=float(r.uniform(0.8, 1.1)), ambient=float(r.uniform(0.4, 0.55)),
        light_tint=(1 + r.uniform(-0.06, 0.06, 3)).astype(np.float32),
        bg_kind=("linear", "radial", "split")[r.integers(3)], bg_colours=bg,
        bg_angle=float(r.uniform(0, 2 * math.pi)), bg_split=float(r.uniform(0.45, 0.85)),
        wears_glasses=bool(r.random() < 0.85))


# ---------------------------------------------------------------------------------------------
# Geometry: everything is placed in canonical 112-pixel coordinates, then mapped through the
# pose (roll, shift, scale) onto the supersampled canvas.


@dataclass(frozen=True)
class _Layout:
    """Feature positions of one image after identity and expression, before the pose."""

    cx: float
    cy: float
    eyes: np.ndarray          # (2, 2): left, right (image left first)
    nose_tip: np.ndarray
    nose_bridge_x: float
    mouth: np.ndarray         # (2, 2): left, right corner
    mouth_mid_y: float        # y of the lip line in the middle
    right_scale: float        # outline half-width scale on the image-right side (yaw)
    left_scale: float


def _layout(t: IdentityTraits, s: Shot) -> _Layout:
    tpl = ARCFACE_112_LANDMARKS.astype(np.float64)
    yaw, pitch = s.yaw, s.pitch
    eyes = tpl[:2].copy()
    eyes[0, 0] -= t.eye_spread
    eyes[1, 0] += t.eye_spread
    eyes[:, 1] += t.eye_dy - pitch * 1.0
    eyes[:, 0] += yaw * 3.0
    nose = tpl[2] + (yaw * 5.5, t.nose_dy + pitch * 2.0)
    mouth = tpl[3:5].copy()
    mouth[0, 0] -= t.mouth_spread + s.smile * 1.5
    mouth[1, 0] += t.mouth_spread + s.smile * 1.5
    mouth[:, 0] += yaw * 3.0
    mouth[:, 1] += t.mouth_dy + pitch * 1.0 - s.smile * 2.5
    mid_y = float(tpl[3:5, 1].mean() + t.mouth_dy + pitch * 1.0 + s.smile * 0.8)
    return _Layout(cx=56.0 - yaw * 3.0, cy=t.face_cy - pitch * 1.0, eyes=eyes, nose_tip=nose,
                   nose_bridge_x=56.0 + yaw * 2.5, mouth=mouth, mouth_mid_y=mid_y,
                   right_scale=1 - 0.08 * yaw, left_scale=1 + 0.08 * yaw)


def _pose_matrix(s: Shot, size: int, supersample: int) -> np.ndarray:
    """2x3 affine map from canonical coordinates to canvas pixels (pixel centres at integers)."""
    a = math.radians(s.roll)
    c, si = math.cos(a) * s.scale, math.sin(a) * s.scale
    centre = np.array([56.0, 62.0])
    rot = np.array([[c, -si], [si, c]])
    offset = centre + np.array(s.shift) - rot @ centre
    unit = size / 112.0 * supersample
    m = np.zeros((2, 3))
    m[:, :2] = rot * unit
    m[:, 2] = (offset + 0.5) * unit - 0.5
    return m


class _Canvas:
    """A region-label map with polygon drawing in canonical coordinates."""

    _SHIFT = 4  # fixed-point bits of cv2 coordinates: sub-pixel precise outlines

    def __init__(self, n: int, matrix: np.ndarray):
        self.labels = np.zeros((n, n), np.uint8)
        self.m = matrix
        self.unit = float(np.hypot(*matrix[0, :2]))

    def _pts(self, pts) -> np.ndarray:
        p = np.asarray(pts, np.float64).reshape(-1, 2) @ self.m[:, :2].T + self.m[:, 2]
        return np.round(p * (1 << self._SHIFT)).astype(np.int32)

    def _within(self, region: Region, p: np.ndarray, within: tuple, draw):
        """Paint ``region`` where ``draw`` marks a mask and the label is one of ``within``."""
        n = self.labels.shape[0]
        pad = 2 + int(self.unit * 2)
        lo, hi = (p.min(0) >> self._SHIFT).tolist(), (p.max(0) >> self._SHIFT).tolist()
        x0, y0 = max(lo[0] - pad, 0), max(lo[1] - pad, 0)
        x1, y1 = min(hi[0] + pad, n), min(hi[1] + pad, n)
        if x1 <= x0 or y1 <= y0:
            return
        roi = self.labels[y0:y1, x0:x1]
        mask = np.zeros_like(roi)
        draw(mask, p - (np.array([x0, y0], np.int32) << self._SHIFT))
        roi[(mask > 0) & _region_lut(within)[roi]] = int(region)

    def poly(self, region: Region, pts, within: tuple | None = None):
        """Fill one polygon, or a list of polygons, optionally only over the ``within`` regions."""
        polys = [self._pts(q) for q in pts] if isinstance(pts, list) and np.ndim(pts[0]) == 2 else [self._pts(pts)]
        if within is None:
            cv2.fillPoly(self.labels, polys, int(region), cv2.LINE_8, self._SHIFT)
            return
        sizes = np.cumsum([len(q) for q in polys])[:-1]
        self._within(region, np.concatenate(polys), within,
                     lambda m, q: cv2.fillPoly(m, np.split(q, sizes), 1, cv2.LINE_8, self._SHIFT))

    def line(self, region: Region, pts, width: float, closed: bool = False, within: tuple | None = None):
        p = self._pts(pts)
        thickness = max(1, int(round(width * self.unit)))
        if within is None:
            cv2.polylines(self.labels, [p], closed, int(region), thickness, cv2.LINE_8, self._SHIFT)
        else:
            self._within(region, p, within,
                         lambda m, q: cv2.polylines(m, [q], closed, 1, thickness, cv2.LINE_8, self._SHIFT))


@functools.lru_cache(maxsize=None)
def _region_lut(regions: tuple) -> np.ndarray:
    lut = np.zeros(256, bool)
    lut[list(regions)] = True
    return lut


@functools.lru_cache(maxsize=None)
def _unit_circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.cos(t), np.sin(t)


def _ellipse(cx, cy, rx, ry, angle_deg=0.0, n=40) -> np.ndarray:
    cos_t, sin_t = _unit_circle(n)
    a = math.radians(angle_deg)
    x, y = rx * cos_t, ry * sin_t
    return np.stack([cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)], 1)


def _face_outline(t: IdentityTraits, lay: _Layout, n: int = 96, grow: float = 0.0) -> np.ndarray:
    """Closed outline from the top of the forehead clockwise; the lower half tapers to the jaw."""
    u = np.linspace(0, 2 * math.pi, n, endpoint=False)
    s, c = np.sin(u), np.cos(u)
    below = np.clip(-c, 0, 1)
    y = np.where(c >= 0, lay.cy - (t.face_top + grow) * c, lay.cy - (t.face_chin + grow) * c)
    half = (t.face_rx + grow) * np.abs(s) * (1 - t.jaw_taper * below ** t.jaw_power)
    side = np.where(s >= 0, lay.right_scale, lay.left_scale)
    return np.stack([lay.cx + np.sign(s) * half * side, y], 1)


def _half_width_at(outline: np.ndarray, y: float, side: int) -> float:
    """x of the outline at height y on one side (+1 right, -1 left)."""
    pts = outline[(outline[:, 0] - outline[:, 0].mean()) * side > 0]
    order = np.argsort(pts[:, 1])
    return float(np.interp(y, pts[order, 1], pts[order, 0]))


def _hair_cap(t: IdentityTraits, lay: _Layout, outline: np.ndarray, volume: float, hairline: float,
              temple: float, side_depth: float = 60.0, bumps: float = 0.0, recede: float = 0.0) -> np.ndarray:
    """Polygon of hair over the skull down to the hairline, with sideburns to ``side_depth``."""
    rx = t.face_rx * 1.04 + volume
    ry = t.face_top + volume + 3
    t0 = math.acos(np.clip((lay.cy - side_depth + 4) / ry, -0.6, 0.95))
    ang = np.linspace(-t0, t0, 48)
    r = 1 + bumps * np.abs(np.sin(ang * 9 + t.strand_phase)) / max(rx, 1)
    side = np.where(ang >= 0, lay.right_scale, lay.left_scale)
    arc = np.stack([lay.cx + rx * np.sin(ang) * r * side, lay.cy - ry * np.cos(ang) * r], 1)
    xr = _half_width_at(outline, temple, 1)
    xl = _half_width_at(outline, temple, -1)
    inner_r = _half_width_at(outline, side_depth, 1) - 2.5
    inner_l = _half_width_at(outline, side_depth, -1) + 2.5
    xs = np.linspace(xr - 1.5, xl + 1.5, 25)
    half = max((xr - xl) / 2 - 1.5, 1.0)
    xn = (xs - (xr + xl) / 2) / half
    ys = hairline + (temple - hairline) * np.abs(xn) ** 2.4
    if recede:
        ys = ys + recede * np.exp(-((np.abs(xn) - 0.6) ** 2) / 0.02)
    line = np.stack([xs, ys], 1)
    return np.concatenate([arc, [[inner_r, side_depth], [xr - 1.5, temple + 2]], line,
                           [[xl + 1.5, temple + 2], [inner_l, side_depth]]])


def _strand(cv: _Canvas, pts, width: float):
    cv.line(Region.HAIR_SHADE, pts, width, within=(Region.HAIR,))


def _draw_hair(cv: _Canvas, t: IdentityTraits, lay: _Layout, outline: np.ndarray, back: bool):
    """Back layer (behind the face) when ``back``, else the front layer."""
    style, vol = t.hair_style, t.hair_volume
    if back:
        if style == "long":
            rx = t.face_rx + vol + 6
            fall = [[lay.cx - rx, lay.cy - 20], [lay.cx - rx - 6, 122], [lay.cx + rx + 6, 122],
                    [lay.cx + rx, lay.cy - 20]]
            # two fills: cv2 fills the overlap of a self-intersecting polygon as a hole
            cv.poly(Region.HAIR, fall)
            cv.poly(Region.HAIR, _ellipse(lay.cx, lay.cy - 6, rx, t.face_top + vol + 6))
        elif style == "curly":
            rx = t.face_rx + vol + 10
            centre = np.array([lay.cx, lay.cy - 8])
            blob = _ellipse(*centre, rx, t.face_top + vol + 10, n=60)
            wobble = 1 + 0.06 * np.abs(np.sin(np.linspace(0, 2 * math.pi, 60, endpoint=False) * 11 + t.strand_phase))
            cv.poly(Region.HAIR, centre + (blob - centre) * wobble[:, None])
        return
    if style == "bald":
        # a fringe of hair left above the ears: a band along the outline, hugging the skull
        for side in (-1, 1):
            band = outline[((outline[:, 0] - lay.cx) * side > 0) & (outline[:, 1] > 34) & (outline[:, 1] < 64)]
            band = band[np.argsort(band[:, 1])]
            inner = band + [-side * 4.0, 0]
            outer = band + [side * 1.5, 0]
            cv.poly(Region.HAIR, np.concatenate([outer, inner[::-1]]))
        return
    if style == "buzz":
        cap = _hair_cap(t, lay, outline, 1.0, t.hairline + 2, t.temple + 2, side_depth=56)
        cv.poly(Region.STUBBLE, cap)
        return
    if style == "slicked":
        cap = _hair_cap(t, lay, outline, 2.0, t.hairline - 2, t.temple - 1, side_depth=56)
        cv.poly(Region.HAIR, cap)
        for i in range(5):
            x = lay.cx + (i - 2) * 9
            _strand(cv, [[x, t.hairline + 1], [x + (i - 2) * 2, -4]], 0.8)
        return
    recede = 10.0 if style == "receding" else 0.0
    bumps = 3.0 if style == "curly" else 0.0
    side_depth = 72.0 if style in ("long", "curly") else 60.0
    cap = _hair_cap(t, lay, outline, vol, t.hairline, t.temple, side_depth=side_depth, bumps=bumps, recede=recede)
    cv.poly(Region.HAIR, cap)
    hl = t.hairline
    if style == "bangs":
        xs = np.linspace(lay.cx - t.face_rx * 0.95, lay.cx + t.face_rx * 0.95, 17)
        fringe_y = hl + 14 + 2.0 * (np.arange(17) % 2) + 4 * ((xs - lay.cx) / t.face_rx) ** 2
        top = [[lay.cx + t.face_rx, hl - 6], [lay.cx - t.face_rx, hl - 6]]
        cv.poly(Region.HAIR, np.concatenate([np.stack([xs, fringe_y], 1), top]), within=(Region.SKIN, Region.HAIR))
        for x in xs[2:-2:3]:
            _strand(cv, [[x, hl], [x + 1, hl + 12]], 0.7)
    elif style == "side_part":
        part = 1 if t.strand_phase > math.pi else -1
        px = lay.cx - part * 12
        far = lay.cx + part * t.face_rx * 1.0
        sweep = [[px, hl - 8], [px + part * 2, hl + 2], [lay.cx + part * 6, hl + 10],
                 [lay.cx + part * 20, hl + 15], [far, t.temple + 4], [far + part * 4, hl - 6]]
        cv.poly(Region.HAIR, sweep, within=(Region.SKIN, Region.HAIR))
        for i in range(3):
            _strand(cv, [[px + part * (4 + 5 * i), hl - 4], [lay.cx + part * (10 + 6 * i), hl + 6 + 2 * i],
                                        [far - part * (8 - 2 * i), t.temple - 2 + i]], 0.7)
    elif style == "long":
        _strand(cv, [[lay.cx + 1, hl - 1], [lay.cx, -4]], 0.9)
        for side in (-1, 1):
            x0 = _half_width_at(outline, 62, side)
            strand = [[x0 - side * 3, 40], [x0 - side * 2, 62], [x0 - side * 0.5, 80], [x0 + side * 6, 118],
                      [x0 + side * 16, 118], [x0 + side * 12, 70], [x0 + side * 6, 36]]
            cv.poly(Region.HAIR, strand)
            _strand(cv, [[x0 + side * 3, 50], [x0 + side * 5, 80], [x0 + side * 9, 116]], 0.8)
    elif style == "curly":
        r = np.random.Generator(np.random.Philox(key=int(t.strand_phase * 1e6)))
        for _ in range(18):
            ang = r.uniform(-2.2, 2.2)
            rad = t.face_top + vol + r.uniform(-4, 8)
            cx = lay.cx + math.sin(ang) * (t.face_rx + vol + 3)
            cy = lay.cy - math.cos(ang) * rad
            if cy < hl - 1 or abs(cx - lay.cx) > t.face_rx - 2:
                _strand(cv, _ellipse(cx, cy, 2.2, 2.2, n=10)[:7], 0.7)


def _draw_beard(cv: _Canvas, t: IdentityTraits, s: Shot, lay: _Layout, outline: np.ndarray):
    if t.beard == "none":
        return
    (lx, ly), (rx, ry) = lay.mouth
    top = lay.nose_tip[1] + 3.5
    lip_top = min(ly, ry) - t.lip_upper - 1.0
    if t.beard in ("full", "stubble"):
        lower = outline[(outline[:, 1] > lay.cy + 2)]
        # right side first, through the chin to the left, so the polygon closes on the upper edge
        lower = lower[np.argsort(np.arctan2(lower[:, 1] - lay.cy, lower[:, 0] - lay.cx))]
        side_y = lay.cy + 7
        upper = [[_half_width_at(outline, side_y, -1) + 1, side_y], [lx - 9, ly - 8], [lx - 3, ly - 3],
                 [lx - 1.5, lip_top - 1], [lay.cx, top], [rx + 1.5, lip_top - 1], [rx + 3, ry - 3],
                 [rx + 9, ry - 8], [_half_width_at(outline, side_y, 1) - 1, side_y]]
        region = Region.BEARD if t.beard == "full" else Region.STUBBLE
        cv.poly(region, np.concatenate([upper, lower]))
    xs, upper_top, seam, _, lower_out = _lip_curves(t, s, lay)
    if t.beard == "goatee":
        mx, chin = float(xs.mean()), lay.cy + t.face_chin
        # a circle beard: down both sides of the mouth and round the chin (the lips are drawn over it)
        half = (xs[-1] - xs[0]) / 2 + 3.0
        arc = _ellipse(mx, chin - 9, half, 7.0, n=24)[:13]  # lower half, right to left
        poly = np.concatenate([[[xs[0] - 3.0, seam[0] + 1]], [[xs[-1] + 3.0, seam[-1] + 1]], arc])
        cv.poly(Region.BEARD, poly, within=(Region.SKIN, Region.STUBBLE))
    if t.beard in ("moustache", "goatee"):
        # a band over the upper lip, thickest in the middle, drooping past the corners
        u = np.linspace(0, 1, len(xs))
        lower = upper_top - 0.3
        upper = lower - (2.2 + 2.0 * np.sin(np.pi * u))
        poly = np.concatenate([[[xs[0] - 2.5, seam[0] + 3.0]], np.stack([xs, upper], 1),
                               [[xs[-1] + 2.5, seam[-1] + 3.0]], np.stack([xs, lower], 1)[::-1]])
        cv.poly(Region.BEARD, poly, within=(Region.SKIN, Region.STUBBLE, Region.BEARD))


def _brow_polygon(t: IdentityTraits, s: Shot, eye: np.ndarray, side: int) -> np.ndarray:
    """Tapering brow above one eye; side -1 is the image-left eye (its inner end points right)."""
    inner = -side  # direction of the nose
    u = np.linspace(0, 1, 12)  # 0 inner end, 1 outer end
    x = eye[0] + inner * t.brow_len * 0.42 - inner * t.brow_len * u
    tilt = math.tan(math.radians(t.brow_tilt))
    y = (eye[1] - t.brow_gap - s.brow_raise - t.brow_arch * np.sin(np.pi * np.clip(u * 0.9 + 0.05, 0, 1))
         - tilt * t.brow_len * (u - 0.4))
    thick = t.brow_thick * (1.0 - 0.55 * u ** 1.5)
    return np.concatenate([np.stack([x, y - thick * 0.45], 1), np.stack([x, y + thick * 0.55], 1)[::-1]])


def _eye_polygon(t: IdentityTraits, s: Shot, eye: np.ndarray, side: int, n: int = 16) -> tuple:
    """Almond-shaped opening; returns (polygon, upper lid points)."""
    u = np.linspace(-1, 1, n)
    openness = s.eye_open
    up = -t.eye_h * openness * (1 - u ** 2) ** 0.75 * (1 - 0.12 * u * side)
    lo = t.eye_h * 0.75 * min(openness, 1.0) ** 0.5 * (1 - u ** 2) ** 0.9
    a = math.radians(-t.eye_tilt * side)
    x = u * t.eye_w
    ca, sa = math.cos(a), math.sin(a)
    upper = np.stack([eye[0] + x * ca - up * sa, eye[1] + x * sa + up * ca], 1)
    lower = np.stack([eye[0] + x * ca - lo * sa, eye[1] + x * sa + lo * ca], 1)
    return np.concatenate([upper, lower[::-1][1:-1]]), upper


def _draw_eyes(cv: _Canvas, t: IdentityTraits, s: Shot, lay: _Layout):
    for side, eye in ((-1, lay.eyes[0]), (1, lay.eyes[1])):
        opening, upper = _eye_polygon(t, s, eye, side)
        cv.line(Region.CREASE, upper + [0, -t.eye_h * 0.9 - 1.2], 0.6)
        cv.poly(Region.SCLERA, opening)
        iris_c = eye + (s.gaze[0] + s.yaw * 0.8, s.gaze[1])
        ri = t.eye_h * 1.05 * t.iris_scale + 0.6
        cv.poly(Region.IRIS, _ellipse(*iris_c, ri, ri, n=24), within=(Region.SCLERA,))
        cv.poly(Region.PUPIL, _ellipse(*iris_c, ri * 0.42, ri * 0.42, n=16), within=(Region.IRIS,))
        cv.poly(Region.GLINT, _ellipse(iris_c[0] + ri * 0.35, iris_c[1] - ri * 0.35, 0.55, 0.55, n=8),
                within=(Region.IRIS, Region.PUPIL))
        cv.line(Region.LASH, upper, 0.75 + 0.15 * t.eye_h)


def _draw_nose(cv: _Canvas, t: IdentityTraits, lay: _Layout):
    tx, ty = lay.nose_tip
    w = t.nose_w
    for side in (-1, 1):
        cv.poly(Region.NOSTRIL, _ellipse(tx + side * w * 0.32, ty + 2.6, 1.7, 0.95, side * 20, n=12))
        wing = [[tx + side * w * 0.48, ty - 3.5], [tx + side * w * 0.66, ty - 0.5], [tx + side * w * 0.6, ty + 2.2],
                [tx + side * w * 0.42, ty + 3.2]]
        cv.line(Region.CREASE, wing, 0.7)


def _lip_curves(t: IdentityTraits, s: Shot, lay: _Layout, n: int = 17):
    (lx, ly), (rx, ry) = lay.mouth
    u = np.linspace(0, 1, n)
    xs = lx + (rx - lx) * u
    base = ly + (ry - ly) * u
    bell = np.sin(np.pi * u)
    seam = base + (lay.mouth_mid_y - (ly + ry) / 2) * bell ** 0.8
    bow = np.exp(-((u - 0.5) ** 2) / 0.004) * 0.9
    upper_top = seam - t.lip_upper * bell ** 0.6 + bow
    gap = s.mouth_open * 7.0 * bell ** 0.8
    lower_in = seam + gap
    lower_out = lower_in + t.lip_lower * bell ** 0.7
    return xs, upper_top, seam, lower_in, lower_out


def _draw_mouth(cv: _Canvas, t: IdentityTraits, s: Shot, lay: _Layout):
    xs, upper_top, seam, lower_in, lower_out = _lip_curves(t, s, lay)
    cv.poly(Region.LIP, np.concatenate([np.stack([xs, seam], 1), np.stack([xs, lower_out], 1)[::-1]]))
    cv.poly(Region.UPPER_LIP, np.concatenate([np.stack([xs, upper_top], 1), np.stack([xs, seam + 0.3], 1)[::-1]]))
    if s.mouth_open > 0.05:
        cv.poly(Region.MOUTH, np.concatenate([np.stack([xs, seam], 1), np.stack([xs, lower_in], 1)[::-1]]))
        teeth = np.minimum(seam + 2.2 + 0.8 * s.smile, lower_in)
        cv.poly(Region.TEETH, np.concatenate([np.stack([xs, seam], 1), np.stack([xs, teeth], 1)[::-1]]),
                within=(Region.MOUTH,))
    else:
        cv.line(Region.MOUTH, np.stack([xs, seam], 1), 0.7)


def _draw_glasses(cv: _Canvas, t: IdentityTraits, lay: _Layout, outline: np.ndarray):
    for side, eye in ((-1, lay.eyes[0]), (1, lay.eyes[1])):
        if t.glasses == "round":
            rim = _ellipse(eye[0], eye[1] + 0.5, 11.5, 9.5, n=32)
        else:
            hx, hy = 12.5, 8.0
            c = np.array([eye[0], eye[1] + 0.8])
            rim = c + np.array([[-hx, -hy], [hx, -hy], [hx, hy * 0.6], [hx * 0.7, hy], [-hx * 0.7, hy],
                                [-hx, hy * 0.6]])
        cv.line(Region.GLASSES, rim, 1.2, closed=True)
        edge = _half_width_at(outline, eye[1] - 2, side)
        cv.line(Region.GLASSES, [[eye[0] + side * 11.5, eye[1] - 2], [edge, eye[1] - 3]], 1.2)
    cv.line(Region.GLASSES, [[lay.eyes[0][0] + 11.5, lay.eyes[0][1] - 1.5], [lay.nose_bridge_x, lay.eyes[0][1] - 3.5],
                             [lay.eyes[1][0] - 11.5, lay.eyes[1][1] - 1.5]], 1.0)


def _draw_regions(cv: _Canvas, t: IdentityTraits, s: Shot, lay: _Layout):
    outline = _face_outline(t, lay)
    _draw_hair(cv, t, lay, outline, back=True)
    neck_w = t.face_rx * 0.62
    cv.poly(Region.NECK, [[lay.cx - neck_w, lay.cy + 10], [lay.cx - neck_w - 4, 125],
                          [lay.cx + neck_w + 4, 125], [lay.cx + neck_w, lay.cy + 10]])
    if t.hair_style not in ("long", "curly"):
        ear_y = float(lay.eyes[:, 1].mean()) + 11
        for side in (-1, 1):
            x = _half_width_at(outline, ear_y, side)
            w = 6.0 * t.ear_size * (1 - 0.4 * side * s.yaw)
            hgt = 11.0 * t.ear_size
            u = np.linspace(-0.5 * math.pi, 1.5 * math.pi, 24, endpoint=False)
            # rounder at the top than at the lobe
            r = 0.9 - 0.1 * np.sin(u)
            ear = np.stack([x + side * (w * 0.35 + w * np.cos(u) * r), ear_y + hgt * np.sin(u) * r - 1], 1)
            cv.poly(Region.EAR, ear)
            fold = u[4:13]  # the helix fold inside the ear
            cv.line(Region.CREASE, np.stack([x + side * w * 0.55 * (1 + np.cos(fold)),
                                             ear_y - 1 + hgt * 0.65 * np.sin(fold)], 1), 0.8)
    cv.poly(Region.SKIN, outline)
    if len(t.freckles):
        dots = [_ellipse(x + s.yaw * 2, y, r, r, n=8) for x, y, r in t.freckles]
        cv.poly(Region.FRECKLE, dots, within=(Region.SKIN,))
    if t.mole is not None:
        x, y, r = t.mole
        cv.poly(Region.MOLE, _ellipse(x + s.yaw * 2, y, r, r, n=10), within=(Region.SKIN,))
    _draw_beard(cv, t, s, lay, outline)
    _draw_hair(cv, t, lay, outline, back=False)
    for side, eye in ((-1, lay.eyes[0]), (1, lay.eyes[1])):
        cv.poly(Region.BROW, _brow_polygon(t, s, eye, side))
    _draw_eyes(cv, t, s, lay)
    _draw_nose(cv, t, lay)
    _draw_mouth(cv, t, s, lay)
    if t.glasses != "none" and s.wears_glasses:
        _draw_glasses(cv, t, lay, outline)


class _Relief:
    """Height of head and features (canonical pixels) sampled on the output grid."""

    def __init__(self, matrix: np.ndarray, n: int):
        inv = cv2.invertAffineTransform(matrix).astype(np.float32)
        g = np.arange(n, dtype=np.float32)
        self.x = inv[0, 0] * g[None, :] + (inv[0, 1] * g + inv[0, 2])[:, None]
        self.y = inv[1, 0] * g[None, :] + (inv[1, 1] * g + inv[1, 2])[:, None]
        self.m, self.n = matrix, n
        self.unit = float(np.hypot(*matrix[0, :2]))
        self.h = np.zeros((n, n), np.float32)

    def bump(self, cx, cy, sx, sy, amp, into: np.ndarray | None = None):
        """Add a Gaussian bump to the height (or to ``into``), evaluated within 3 sigma of its centre."""
        into = self.h if into is None else into
        m = self.m
        px = m[0, 0] * cx + m[0, 1] * cy + m[0, 2]
        py = m[1, 0] * cx + m[1, 1] * cy + m[1, 2]
        r = 3 * max(sx, sy) * self.unit
        x0, x1 = max(int(px - r), 0), min(int(px + r) + 2, self.n)
        y0, y1 = max(int(py - r), 0), min(int(py + r) + 2, self.n)
        if x1 <= x0 or y1 <= y0:
            return
        x, y = self.x[y0:y1, x0:x1], self.y[y0:y1, x0:x1]
        into[y0:y1, x0:x1] += amp * np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _height_map(t: IdentityTraits, s: Shot, lay: _Layout, matrix: np.ndarray, n: int) -> _Relief:
    rel = _Relief(matrix, n)
    x, y = rel.x, rel.y
    # Head: a dome over face and hair, taller below the eyes than the forehead is.
    rx = t.face_rx + 5
    ry = np.where(y < lay.cy, t.face_top + t.hair_volume + 8, t.face_chin + 6).astype(np.float32)
    d = 1 - ((x - lay.cx - s.yaw * 2) / rx) ** 2 - ((y - lay.cy) / ry) ** 2
    rel.h += 40 * np.sqrt(np.clip(d, 0.0, None))
    # Nose: a ridge from between the eyes to the tip, fading in at the bridge.
    tx, ty = lay.nose_tip
    bridge_y = float(lay.eyes[:, 1].mean()) - 2
    y0, y1 = max(int(bridge_y * rel.unit) - 12, 0), min(int((ty + 6) * rel.unit) + 12, n)
    xs, ys = x[y0:y1], y[y0:y1]
    along = np.clip((ys - bridge_y) / (ty - bridge_y), 0, 1)
    ridge_x = lay.nose_bridge_x + (tx - lay.nose_bridge_x) * along
    ridge = t.nose_height * along ** 1.3 * np.exp(-0.5 * ((xs - ridge_x) / (2.0 + 1.8 * along)) ** 2)
    rel.h[y0:y1] += ridge * np.clip((ty + 2.5 - ys) / 3, 0, 1)
    rel.bump(tx, ty, 3.2, 2.8, t.nose_height * 0.25)
    for side in (-1, 1):
        rel.bump(tx + side * t.nose_w * 0.55, ty + 0.5, 2.4, 2.2, 3.0)
    for e in lay.eyes:
        rel.bump(e[0], e[1], 7.5, 5.0, -4.5)
        rel.bump(e[0], e[1] - t.brow_gap, 8.0, 2.8, 2.0)
        rel.bump(e[0] * 1.05 - 2.8, e[1] + 19, 8.0, 6.0, 3.5)
    mx = float(lay.mouth[:, 0].mean())
    rel.bump(mx, lay.mouth_mid_y - 2, 11, 5, 2.5)
    rel.bump(mx, lay.mouth_mid_y + t.lip_lower + 3, 9, 2.0, -1.6)
    rel.bump(lay.cx, lay.cy + t.face_chin - 8, 10, 6, 3.5)
    return rel


# ---------------------------------------------------------------------------------------------
# The two looks.


@dataclass
class _Scene:
    traits: IdentityTraits
    shot: Shot
    size: int
    labels: np.ndarray        # (size*SS, size*SS) uint8 Region map
    lambert: np.ndarray       # (size, size) float32 diffuse term in [0, 1]
    specular: np.ndarray      # (size, size) float32
    blush: np.ndarray         # (size, size) float32 cheek weight


def _build_scene(identity: int, k: int, seed: int, size: int) -> _Scene:
    t = identity_traits(identity, seed)
    s = shot_variation(identity, k, seed)
    lay = _layout(t, s)
    cv = _Canvas(size * _SUPERSAMPLE, _pose_matrix(s, size, _SUPERSAMPLE))
    _draw_regions(cv, t, s, lay)

    m1 = _pose_matrix(s, size, 1)
    rel = _height_map(t, s, lay, m1, size)
    gy, gx = np.gradient(rel.h * np.float32(size / 112.0 * s.scale))
    inv_norm = 1 / np.sqrt(gx * gx + gy * gy + 1)
    L = s.light
    lam = np.clip((L[2] - gx * L[0] - gy * L[1]) * inv_norm, 0, 1)
    half = L + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half)
    spec = np.clip((half[2] - gx * half[0] - gy * half[1]) * inv_norm, 0, 1) ** 24
    blush = np.zeros((size, size), np.float32)
    if t.blush > 0.05:
        for e in lay.eyes:
            rel.bump(e[0] * 1.05 - 2.8, e[1] + 19, 7, 5, t.blush, into=blush)
    return _Scene(t, s, size, cv.labels, lam.astype(np.float32), spec.astype(np.float32), blush)


def _palette(t: IdentityTraits) -> np.ndarray:
    p = np.zeros((_N_REGIONS, 3), np.float32)
    skin, hair = t.skin, t.hair_colour
    p[Region.SKIN] = skin
    p[Region.NECK] = skin * 0.78
    p[Region.EAR] = skin * np.array([0.97, 0.88, 0.86], np.float32)
    p[Region.CREASE] = skin * np.array([0.74, 0.62, 0.6], np.float32)
    p[Region.HAIR] = hair
    p[Region.HAIR_SHADE] = hair * 0.6 + 0.02
    p[Region.BROW] = hair * 0.8 if hair.mean() < 0.5 else hair * 0.55
    p[Region.SCLERA] = (0.93, 0.91, 0.88)
    p[Region.IRIS] = t.iris_colour
    p[Region.PUPIL] = (0.04, 0.03, 0.03)
    p[Region.LASH] = np.minimum(hair, 0.2) * 0.5 + 0.02
    p[Region.NOSTRIL] = skin * np.array([0.42, 0.32, 0.3], np.float32)
    p[Region.LIP] = t.lip_colour
    p[Region.UPPER_LIP] = t.lip_colour * 0.85
    p[Region.MOUTH] = (0.28, 0.08, 0.08)
    p[Region.TEETH] = (0.93, 0.9, 0.82)
    p[Region.BEARD] = hair * 0.72
    p[Region.STUBBLE] = skin * 0.72 + hair * 0.2
    p[Region.GLASSES] = t.glasses_colour
    p[Region.FRECKLE] = skin * np.array([0.8, 0.62, 0.5], np.float32)
    p[Region.MOLE] = skin * 0.35 + np.array([0.05, 0.02, 0.0], np.float32)
    p[Region.GLINT] = (1.0, 1.0, 1.0)
    return p


def _saturate(rgb: np.ndarray, amount: float, axis: int = -1) -> np.ndarray:
    """Scale the distance from grey; ``axis`` is the channel axis (-1 for HWC, 0 for planar)."""
    w = np.array([0.299, 0.587, 0.114], np.float32)
    if axis == 0:
        lum = np.tensordot(w, rgb, 1)
        return np.clip(lum + (rgb - lum) * np.float32(amount), 0, 1)
    lum = (rgb @ w)[..., None]
    return np.clip(lum + (rgb - lum) * np.float32(amount), 0, 1)


def _background(s: Shot, n: int) -> np.ndarray:
    """Planar (3, n, n) backdrop: a linear or radial gradient, or two flat areas."""
    g = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
    gx, gy = g[None, :], g[:, None]
    if s.bg_kind == "radial":
        w = np.clip(np.sqrt(gx ** 2 + gy ** 2) * 1.5, 0, 1)
    elif s.bg_kind == "split":
        w = ((gx * math.cos(s.bg_angle) * 0.4 + gy) > s.bg_split - 0.5).astype(np.float32)
    else:
        w = np.clip(gx * math.cos(s.bg_angle) + gy * math.sin(s.bg_angle) + 0.5, 0, 1)
    c0, c1 = s.bg_colours
    return c0[:, None, None] + (c1 - c0)[:, None, None] * w[None]


def _planar(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def _to_uint8(planar: np.ndarray) -> np.ndarray:
    """Planar float [0, 1] -> HWC uint8, rounded and saturated."""
    hwc = cv2.threshold(cv2.merge(list(planar)), 0, 0, cv2.THRESH_TOZERO)[1]
    return cv2.convertScaleAbs(hwc, alpha=255.0)


def _area_lookup(labels: np.ndarray, table: np.ndarray, size: int) -> np.ndarray:
    """Per-region values (a (256, 4) table) looked up on the supersampled map and area-averaged
    to the output size: colours with anti-aliased edges, or the coverage of chosen regions."""
    looked_up = cv2.LUT(cv2.merge((labels, labels, labels, labels)), table.reshape(256, 1, 4))
    return _planar(cv2.resize(looked_up, (size, size), interpolation=cv2.INTER_AREA))


def _look_render(sc: _Scene) -> np.ndarray:
    """Flat colours and two hard shading steps, drawn at the supersampled size then area-averaged."""
    t, s, size = sc.traits, sc.shot, sc.size
    n = size * _SUPERSAMPLE
    pal = _saturate(_palette(t), 1.3)
    # table indexed by region * 3 + band: colour and background coverage in one lookup
    bands = np.array([0.55, 0.78, 1.0], np.float32)
    light = s.ambient + (1 - s.ambient) * min(s.light_intensity / 0.95, 1.0) * bands
    shade = 1 + _SHADED[:, None] * (light[None, :] - 1)
    table = np.zeros((256, 4), np.float32)
    table[:_N_REGIONS * 3, :3] = (pal[:, None, :] * shade[..., None]).reshape(-1, 3)
    table[:3] = (0, 0, 0, 1)
    lam = cv2.resize(sc.lambert, (n, n), interpolation=cv2.INTER_LINEAR)
    band = (lam > 0.2).astype(np.uint8) + (lam > 0.5)
    out = _area_lookup(sc.labels * np.uint8(3) + band, table, size)
    return _to_uint8(out[:3] + _background(s, size) * out[3])


def _look_photo(sc: _Scene, identity: int, k: int, seed: int) -> np.ndarray:
    """Soft light, texture, blur, colour cast, sensor noise and JPEG, from the same scene."""
    t, s, size = sc.traits, sc.shot, sc.size
    r = _rng(seed, _PHOTO_STREAM, identity, k)
    colour = np.zeros((256, 4), np.float32)
    colour[:_N_REGIONS, :3] = _saturate(_palette(t), 0.95)
    colour[:_N_REGIONS, 3] = _SHADED
    img, shaded = np.split(_area_lookup(sc.labels, colour, size), [3])
    kinds = np.zeros((256, 4), np.float32)
    kinds[list(_SKIN_LIKE + (Region.LIP, Region.UPPER_LIP)), 0] = 1
    kinds[list(_HAIR_LIKE), 1] = 1
    kinds[Region.BACKGROUND, 2] = 1
    skin, hair, bg_cov, _ = _area_lookup(sc.labels, kinds, size)

    def smooth_noise(cell: float) -> np.ndarray:
        m = max(2, int(round(size / cell)))
        return cv2.resize(r.standard_normal((m, m), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC)

    # Skin: reddish blotches and pores; hair: strands, mostly vertical.
    blotch = smooth_noise(10.0)
    pores, strands, grain = r.standard_normal((3, size, size), dtype=np.float32)
    strands = cv2.GaussianBlur(strands, (0, 0), sigmaX=0.5, sigmaY=2.5)
    img = img * (1 + skin * (0.035 * pores + 0.03 * blotch) + hair * 0.45 * strands)
    img += (skin * (0.02 * blotch + 0.05 * sc.blush)) * np.array([1.0, -0.3, -0.3], np.float32)[:, None, None]

    # Soft diffuse light tinted by the light colour, warm in shadow, and a highlight on skin.
    lam = cv2.GaussianBlur(sc.lambert, (0, 0), 0.7)
    light = s.ambient + (1 - s.ambient) * s.light_intensity * lam / 0.92
    warm_shadow = np.array([0.06, 0.0, -0.03], np.float32)[:, None, None]
    light_rgb = light * s.light_tint[:, None, None] + (1 - light) * warm_shadow
    img = img * (1 + shaded * (light_rgb - 1))
    img += sc.specular * skin * (0.25 * s.light_intensity)

    bg = _background(s, size) * (1 + 0.06 * smooth_noise(14.0))
    bg = _planar(cv2.GaussianBlur(cv2.merge(list(bg)), (0, 0), 1.5))
    img = img * (1 - bg_cov) + bg * bg_cov

    img = _planar(cv2.GaussianBlur(cv2.merge(list(img)), (0, 0), float(r.uniform(0.5, 0.85))))
    cast = (1 + r.normal(0, 0.03, 3) + (0.02, 0.0, -0.02)).astype(np.float32)
    img = _saturate(img * cast[:, None, None], float(r.uniform(0.8, 0.95)), axis=0)
    g = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    vignette = 1 - np.float32(r.uniform(0.2, 0.45)) * (g[None, :] ** 2 + g[:, None] ** 2)
    sigma = np.float32(r.uniform(0.012, 0.026))
    img = img * vignette + grain * sigma + r.standard_normal((3, size, size), dtype=np.float32) * (sigma * 0.5)
    quality = int(r.integers(60, 81))
    ok, buf = cv2.imencode(".jpg", _to_uint8(img[::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


# ---------------------------------------------------------------------------------------------
# Public API.


def _check(identity: int, k: int, seed: int, size: int):
    for name, v in (("identity", identity), ("k", k), ("seed", seed)):
        if int(v) != v or not 0 <= v < 2 ** 32:
            raise RtkitError(f"{name} must be an integer in [0, 2**32), got {v!r}")
    if not 32 <= size <= 1024:
        raise RtkitError(f"size must be between 32 and 1024 pixels, got {size}")


def _render_styles(identity: int, k: int, styles, seed: int, size: int) -> dict:
    for st in styles:
        if st not in STYLES:
            raise RtkitError(f"style must be one of {STYLES}, got {st!r}")
    _check(identity, k, seed, size)
    scene = _build_scene(identity, k, seed, size)
    return {st: _look_render(scene) if st == "render" else _look_photo(scene, identity, k, seed)
            for st in styles}


def render_face(identity: int, k: int, style: str = "render", seed: int = 0, size: int = 112) -> np.ndarray:
    """Image ``k`` of ``identity`` as a (size, size, 3) uint8 RGB array.

    The same (identity, k, seed, size) in the two styles gives a pixel-aligned pair.
    """
    return _render_styles(identity, k, (style,), seed, size)[style]


def render_pair(identity: int, k: int, seed: int = 0, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """(render, photo) of one scene, drawn once: a pixel-aligned training pair."""
    out = _render_styles(identity, k, STYLES, seed, size)
    return out["render"], out["photo"]


def face_landmarks(identity: int, k: int, seed: int = 0, size: int = 112) -> np.ndarray:
    """(5, 2) float32 (x, y) pixel positions of eyes, nose tip and mouth corners in image ``k``."""
    _check(identity, k, seed, size)
    t, s = identity_traits(identity, seed), shot_variation(identity, k, seed)
    lay = _layout(t, s)
    m = _pose_matrix(s, size, 1)
    pts = np.concatenate([lay.eyes, lay.nose_tip[None], lay.mouth])
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def make_sample_dataset(root, *, style: str = "render", identities: int = 20, per_identity: int = 8,
                        seed: int = 0, size: int = 112, workers: int | None = None,
                        first_identity: int = 0) -> list[Path]:
    """Write ``root/<identity>/<k>.png`` (DigiFace-1M layout) and return the paths, sorted.

    ``style`` is "render", "photo" or "both"; "both" writes ``root/render/...`` and
    ``root/photo/...`` from the same scenes (pixel-aligned pairs). Output is byte-identical
    for the same arguments whatever ``workers`` is.

    ``first_identity`` draws identities ``first_identity .. first_identity + identities - 1``
    (folders named by those numbers): sets of one seed with disjoint ranges share no identity
    and no folder name, so training, translator-target and test sets can be cut from one world.
    """
    styles = STYLES if style == "both" else (style,)
    if style != "both" and style not in STYLES:
        raise RtkitError(f"style must be one of {STYLES + ('both',)}, got {style!r}")
    if identities < 1 or per_identity < 1:
        raise RtkitError(f"need at least one identity and one image each, got {identities} x {per_identity}")
    if int(first_identity) != first_identity or first_identity < 0:
        raise RtkitError(f"first_identity must be a non-negative integer, got {first_identity!r}")
    first_identity = int(first_identity)
    _check(first_identity + identities - 1, per_identity - 1, seed, size)
    ids = range(first_identity, first_identity + identities)
    root = Path(root)
    dirs = {st: (root / st if style == "both" else root) for st in styles}
    if root.exists() and not root.is_dir():
        raise RtkitError(f"output path exists and is not a folder: {root}")
    for d in dirs.values():
        for i in ids:
            (d / str(i)).mkdir(parents=True, exist_ok=True)

    def one(job):
        i, k = job
        images = _render_styles(i, k, styles, seed, size)
        paths = []
        for st, img in images.items():
            path = dirs[st] / str(i) / f"{k}.png"
            ok, buf = cv2.imencode(".png", img[..., ::-1])
            if not ok:
                raise RuntimeError(f"PNG encoding failed for {path}")
            tmp = path.with_name(f".{path.name}.tmp")  # a killed run leaves no half-written PNG
            tmp.write_bytes(buf.tobytes())
            os.replace(tmp, path)
            paths.append(path)
        return paths

    jobs = [(i, k) for i in ids for k in range(per_identity)]
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1:
        results = [one(j) for j in jobs]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, jobs))
    return sorted(p for ps in results for p in ps)
