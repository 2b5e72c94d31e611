"""Deterministic synthetic chest phantoms with known identities, for tests, demos and smoke training.

Real chest radiographs cannot ship with the project, yet every part of it (training, evaluation, the
gallery, the service) needs identity-labelled images to run end to end. A phantom *patient* is a fixed
anatomy drawn from a seed: lung outlines, heart, ribs, clavicles, spine, pulmonary vessels and a few
individual marks (calcified granulomas, a healed rib fracture, sternotomy wires). A phantom *study*
of that patient varies what changes between real examinations: pose, inspiration depth, exposure,
contrast, noise, sharpness, and devices (ECG leads, lines, pacemaker, side marker). Patients differ in
anatomy more than one patient's studies differ, so a small CNN can learn to tell them apart, but no
two studies are pixel-identical.

Everything is drawn with numpy and Pillow's ImageDraw (no scipy); a 256 px phantom takes a few ms.
These are phantoms, not radiographs: never mix them into clinical data.

Why one module of this size: it is one drawing; each anatomical part is a small function and all of
them share the patient's geometry.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

__all__ = [
    "LungSpec",
    "PhantomSpec",
    "make_patient",
    "render_study",
    "write_phantom_set",
]

# Distinct stream tags so patient, vessel, study and set randomness never share draws.
_TAG_PATIENT = 0x5041_5449  # "PATI"
_TAG_VESSELS = 0x5645_5353  # "VESS"
_TAG_STUDY = 0x5354_5544  # "STUD"
_TAG_SET = 0x5345_5453  # "SETS"

_MANIFEST_COLUMNS = ("path", "patient_id", "view", "sex", "age", "offset_days", "split")
_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_FIELD_OF_VIEW_MM = 400.0  # detector side the phantom spans, for PixelSpacing
_BASE_STUDY_DATE = date(2020, 1, 1)
_MAX_PATIENTS_PER_SET = 100_000


@dataclass(frozen=True)
class LungSpec:
    """One lung outline, distances as fractions of the image side, measured from the midline."""

    apex_y: float  # top of the apex
    base_y: float  # costophrenic angle
    medial: float  # medial border distance from midline
    lateral: float  # widest lateral extent
    dome: float  # diaphragm dome height above the costophrenic angle
    apex_shape: float  # exponent: larger = blunter, wider apex
    wobble: tuple[float, ...]  # Fourier amplitudes/phases of the individual outline irregularity


@dataclass(frozen=True)
class PhantomSpec:
    """The fixed anatomy of one phantom patient; every study of the patient renders from it."""

    seed: int
    patient_id: str
    sex: str  # "F" | "M"
    age: int  # years at the first study
    thorax_half_width: float
    neck_half_width: float
    shoulder_y: float
    right_lung: LungSpec  # patient's right = image left (PA view)
    left_lung: LungSpec
    heart_offset: float  # heart centre to the image right of the midline
    heart_half_width: float
    heart_half_height: float
    heart_tilt: float  # radians
    aortic_knob: float  # radius
    spine_half_width: float
    scoliosis: tuple[float, float, float]  # amplitude, frequency, phase of the spine's sideways curve
    vertebra_height: float
    n_ribs: int
    rib_top_y: float
    rib_spacing: float
    rib_rise: float
    rib_droop: float
    rib_thickness: float
    rib_jitter: tuple[tuple[float, float], ...]  # per rib: (right, left) vertical offsets
    clavicle_angles: tuple[float, float]  # degrees, (right, left)
    clavicle_length: float
    clavicle_y: float
    clavicle_thickness: float
    granulomas: tuple[tuple[float, float, float], ...]  # (x, y, radius) calcified nodules
    fracture: tuple[int, int, float, float] | None  # (side -1/+1, rib index, position 0-1, step)
    sternotomy: bool
    breast: float  # soft-tissue density of breast shadows (0 for none)


# --------------------------------------------------------------------------------------------------
# patient


def make_patient(seed: int) -> PhantomSpec:
    """Draw one phantom patient's anatomy from ``seed`` (same seed, same anatomy, on any machine)."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([_TAG_PATIENT, seed])
    u = rng.uniform
    sex = "F" if rng.random() < 0.5 else "M"
    size_factor = 0.96 if sex == "F" else 1.0

    def lung(base_y: float) -> LungSpec:
        return LungSpec(
            apex_y=float(u(0.12, 0.2)),
            base_y=float(base_y),
            medial=float(u(0.04, 0.075)),
            lateral=float(u(0.3, 0.39) * size_factor),
            dome=float(u(0.03, 0.085)),
            apex_shape=float(u(2.0, 4.0)),
            wobble=tuple(float(v) for v in np.concatenate([u(0.0, 0.012, 4), u(0.0, 2 * math.pi, 4)])),
        )

    right_base = float(u(0.7, 0.82))
    left_base = right_base + float(u(0.01, 0.045))  # the right hemidiaphragm sits higher
    n_ribs = int(rng.integers(9, 12))
    rib_top = float(u(0.15, 0.2))
    rib_spacing = float(u(0.05, 0.066))
    n_granulomas = int(rng.choice([0, 1, 1, 2, 3]))
    granulomas = tuple(
        (float(0.5 + rng.choice([-1, 1]) * u(0.12, 0.3)), float(u(0.28, 0.65)), float(u(0.006, 0.013)))
        for _ in range(n_granulomas)
    )
    fracture = None
    if rng.random() < 0.35:
        fracture = (
            int(rng.choice([-1, 1])),
            int(rng.integers(2, n_ribs - 1)),
            float(u(0.45, 0.85)),
            float(rng.choice([-1, 1]) * u(0.004, 0.009)),
        )
    return PhantomSpec(
        seed=seed,
        patient_id=f"phantom-{seed:06d}",
        sex=sex,
        age=int(rng.integers(18, 90)),
        thorax_half_width=float(u(0.4, 0.46) * size_factor),
        neck_half_width=float(u(0.07, 0.1)),
        shoulder_y=float(u(0.1, 0.16)),
        right_lung=lung(right_base),
        left_lung=lung(left_base),
        heart_offset=float(u(0.025, 0.08)),
        heart_half_width=float(u(0.13, 0.2)),
        heart_half_height=float(u(0.085, 0.125)),
        heart_tilt=float(u(-0.55, -0.15)),
        aortic_knob=float(u(0.022, 0.04)),
        spine_half_width=float(u(0.032, 0.05)),
        scoliosis=(float(u(0.0, 0.025)), float(u(0.5, 1.5)), float(u(0.0, 2 * math.pi))),
        vertebra_height=float(u(0.045, 0.06)),
        n_ribs=n_ribs,
        rib_top_y=rib_top,
        rib_spacing=rib_spacing,
        rib_rise=float(u(0.015, 0.06)),
        rib_droop=float(u(0.04, 0.13)),
        rib_thickness=float(u(0.011, 0.019)),
        rib_jitter=tuple((float(u(-0.007, 0.007)), float(u(-0.007, 0.007))) for _ in range(n_ribs)),
        clavicle_angles=(float(u(-4, 24)), float(u(-4, 24))),
        clavicle_length=float(u(0.19, 0.27)),
        clavicle_y=float(u(0.14, 0.2)),
        clavicle_thickness=float(u(0.014, 0.024)),
        granulomas=granulomas,
        fracture=fracture,
        sternotomy=bool(rng.random() < 0.12),
        breast=float(u(0.06, 0.16)) if sex == "F" else 0.0,
    )


# --------------------------------------------------------------------------------------------------
# study


@dataclass(frozen=True)
class _Study:
    """What changes between examinations of one phantom patient."""

    rotation: float  # radians
    shift: tuple[float, float]
    scale: float
    inspiration: float  # lung height factor (diaphragm level)
    heart_scale: float
    gamma: float
    contrast: float
    offset: float
    gradient: float  # heel-effect style brightness slope, top to bottom
    noise: float
    blur: float  # gaussian sigma in pixels at 256 px
    ecg: bool
    line: bool
    pacemaker: bool
    marker: int  # -1 none, else corner 0-3


def _draw_study(patient: PhantomSpec, study_seed: int) -> tuple[_Study, np.random.Generator]:
    rng = np.random.default_rng([_TAG_STUDY, patient.seed, int(study_seed)])
    u = rng.uniform
    study = _Study(
        rotation=math.radians(float(np.clip(rng.normal(0.0, 1.5), -4.0, 4.0))),
        shift=(
            float(np.clip(rng.normal(0, 0.012), -0.03, 0.03)),
            float(np.clip(rng.normal(0, 0.012), -0.03, 0.03)),
        ),
        scale=float(u(0.96, 1.04)),
        inspiration=float(u(0.95, 1.04)),
        heart_scale=float(u(0.97, 1.03)),
        gamma=float(u(0.75, 1.3)),
        contrast=float(u(0.85, 1.15)),
        offset=float(u(-0.06, 0.06)),
        gradient=float(u(-0.06, 0.06)),
        noise=float(u(0.006, 0.025)),
        blur=float(u(0.6, 1.4)),
        ecg=bool(rng.random() < 0.3),
        line=bool(rng.random() < 0.2),
        pacemaker=bool(rng.random() < 0.08),
        marker=int(rng.integers(0, 4)) if rng.random() < 0.6 else -1,
    )
    return study, rng


class _Canvas:
    """Float layers plus the study's pose: maps phantom coordinates (0-1, y down) to pixels."""

    def __init__(self, size: int, study: _Study) -> None:
        self.size = size
        c, s = math.cos(study.rotation), math.sin(study.rotation)
        self._m = study.scale * np.array([[c, -s], [s, c]])
        self._t = np.array([0.5 + study.shift[0], 0.5 + study.shift[1]])

    def px(self, points: np.ndarray) -> list[tuple[float, float]]:
        pts = (np.asarray(points, dtype=np.float64) - 0.5) @ self._m.T + self._t
        pts *= self.size
        return [(float(x), float(y)) for x, y in pts]

    def width(self, fraction: float) -> int:
        return max(1, round(fraction * self.size))

    def layer(self, mode: str = "F") -> tuple[Image.Image, ImageDraw.ImageDraw]:
        im = Image.new(mode, (self.size, self.size), 0)
        return im, ImageDraw.Draw(im)


def _ellipse(cx: float, cy: float, rx: float, ry: float, tilt: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(tilt), math.sin(tilt)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _lung_outline(lung: LungSpec, side: int, inspiration: float) -> np.ndarray:
    """Closed outline: apex -> lateral wall -> costophrenic angle -> diaphragm dome -> medial border."""
    base_y = lung.apex_y + (lung.base_y - lung.apex_y) * inspiration
    apex_d = lung.medial + 0.045
    t = np.linspace(0.0, 1.0, 24)
    lat_d = apex_d + (lung.lateral - apex_d) * (1.0 - (1.0 - t) ** lung.apex_shape)
    lat_y = lung.apex_y + (base_y - lung.apex_y) * t
    w = np.linspace(0.0, 1.0, 14)[1:]
    dia_d = lung.lateral + (lung.medial - lung.lateral) * w
    dia_y = base_y - lung.dome * np.sin(0.5 * math.pi * np.minimum(1.0, w / 0.55))
    m = np.linspace(0.0, 1.0, 10)[1:-1]
    med_d = lung.medial + (apex_d - lung.medial) * m**2
    med_y = (base_y - lung.dome) + (lung.apex_y - (base_y - lung.dome)) * m
    d = np.concatenate([lat_d, dia_d, med_d])
    y = np.concatenate([lat_y, dia_y, med_y])
    # individual irregularity along the outline, fixed per patient
    phi = np.linspace(0.0, 2 * math.pi, d.size, endpoint=False)
    amps, phases = lung.wobble[:4], lung.wobble[4:]
    d = d + sum(a * np.sin((k + 2) * phi + p) for k, (a, p) in enumerate(zip(amps, phases, strict=True)))
    return np.stack([0.5 + side * d, y], axis=1)


def _vessel_tree(patient: PhantomSpec) -> list[tuple[np.ndarray, float]]:
    """Per-patient pulmonary vessels: branching random walks out of each hilum (fixed anatomy)."""
    rng = np.random.default_rng([_TAG_VESSELS, patient.seed])
    out: list[tuple[np.ndarray, float]] = []
    for side, lung in ((-1, patient.right_lung), (1, patient.left_lung)):
        hilum = np.array(
            [0.5 + side * (lung.medial + 0.05), lung.apex_y + 0.42 * (lung.base_y - lung.apex_y)]
        )
        for angle in np.linspace(-1.25, 1.25, int(rng.integers(6, 10))):
            theta = angle + rng.normal(0, 0.12)
            stack = [(hilum, theta, 0.0045, 0)]
            while stack:
                start, theta, width, depth = stack.pop()
                pts = [start]
                p = start.copy()
                for _ in range(int(rng.integers(3, 6))):
                    theta += rng.normal(0, 0.25)
                    step = rng.uniform(0.025, 0.045)
                    p = p + step * np.array([side * math.cos(theta), math.sin(theta)])
                    pts.append(p)
                out.append((np.array(pts), width))
                if depth < 2:
                    for _ in range(int(rng.integers(1, 3))):
                        stack.append(
                            (
                                pts[int(rng.integers(1, len(pts)))],
                                theta + rng.normal(0, 0.6),
                                width * 0.6,
                                depth + 1,
                            )
                        )
    return out


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur with edge padding (numpy only; Pillow cannot blur float images)."""
    if sigma <= 0.05:
        return img
    radius = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape
    padded = np.pad(img, ((0, 0), (radius, radius)), mode="edge")
    tmp = np.zeros_like(img)
    for i, kv in enumerate(k):
        tmp += kv * padded[:, i : i + w]
    padded = np.pad(tmp, ((radius, radius), (0, 0)), mode="edge")
    out = np.zeros_like(img)
    for i, kv in enumerate(k):
        out += kv * padded[i : i + h, :]
    return out


def render_study(patient: PhantomSpec, study_seed: int, size: int = 256) -> np.ndarray:
    """Render one study of ``patient``: float32 (size, size) in [0, 1], bone bright (MONOCHROME2).

    Same (patient, study_seed, size) -> same pixels. Different study seeds of one patient differ in
    pose, inspiration, exposure, noise and devices but keep the anatomy.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    study, rng = _draw_study(patient, study_seed)
    cv = _Canvas(size, study)
    p = patient

    # soft tissue: body, then lungs (low density) over it, then heart and great vessels over the lungs
    soft, ds = cv.layer()
    tw, nw, sy = p.thorax_half_width, p.neck_half_width, p.shoulder_y
    body = np.array(
        [
            [0.5 - nw, -0.2], [0.5 + nw, -0.2], [0.5 + nw, sy - 0.03], [0.5 + tw + 0.06, sy + 0.03],
            [0.5 + tw + 0.09, sy + 0.12], [0.5 + tw + 0.04, 0.6], [0.5 + tw + 0.08, 1.2],
            [0.5 - tw - 0.08, 1.2], [0.5 - tw - 0.04, 0.6], [0.5 - tw - 0.09, sy + 0.12],
            [0.5 - tw - 0.06, sy + 0.03], [0.5 - nw, sy - 0.03],
        ]
    )  # fmt: skip
    ds.polygon(cv.px(body), fill=1.0)
    mask, dm = cv.layer("L")
    for side, lung in ((-1, p.right_lung), (1, p.left_lung)):
        outline = cv.px(_lung_outline(lung, side, study.inspiration))
        ds.polygon(outline, fill=0.16)
        dm.polygon(outline, fill=255)
    # trachea: an air column down the midline to the carina
    carina_y = min(p.right_lung.apex_y, p.left_lung.apex_y) + 0.17
    ds.line(
        cv.px(np.array([[0.5, -0.1], [0.5, carina_y], [0.47, carina_y + 0.04]])),
        fill=0.5,
        width=cv.width(0.03),
    )
    hs = study.heart_scale
    heart_cy = p.left_lung.apex_y + (p.left_lung.base_y - p.left_lung.apex_y) * study.inspiration
    heart_cy -= p.left_lung.dome + p.heart_half_height * hs * 0.55
    heart_cx = 0.5 + p.heart_offset
    ds.polygon(
        cv.px(_ellipse(heart_cx, heart_cy, p.heart_half_width * hs, p.heart_half_height * hs, p.heart_tilt)),
        fill=0.95,
    )
    knob_y = heart_cy - p.heart_half_height - 0.07
    ds.polygon(cv.px(_ellipse(0.5 + 0.055, knob_y, p.aortic_knob, p.aortic_knob * 0.9)), fill=0.92)
    ds.polygon(
        cv.px(
            np.array([[0.5 - 0.045, knob_y], [0.5 + 0.04, knob_y], [heart_cx, heart_cy], [0.47, heart_cy]])
        ),
        fill=0.95,
    )

    # bone: spine, ribs, clavicles, humeral heads
    bone, db = cv.layer()
    amp, freq, phase = p.scoliosis
    vh = p.vertebra_height
    for y in np.arange(-0.05, 1.05, vh):
        xc = 0.5 + amp * math.sin(freq * math.pi * y + phase)
        hw = p.spine_half_width * (0.85 + 0.3 * y)
        db.polygon(
            cv.px(np.array([[xc - hw, y], [xc + hw, y], [xc + hw, y + 0.8 * vh], [xc - hw, y + 0.8 * vh]])),
            fill=0.55,
        )
        db.polygon(cv.px(_ellipse(xc, y + 0.4 * vh, 0.008, 0.012, n=12)), fill=0.9)
    rib_w = cv.width(p.rib_thickness)
    u = np.linspace(0.0, 1.0, 16)
    for k in range(p.n_ribs):
        droop = p.rib_droop * (1.0 + 0.06 * k)
        for si, (side, lung) in enumerate(((-1, p.right_lung), (1, p.left_lung))):
            y0 = p.rib_top_y + k * p.rib_spacing + p.rib_jitter[k][si]
            reach = min(p.thorax_half_width - 0.01, lung.lateral + 0.03 + 0.02 * k / p.n_ribs)
            d = p.spine_half_width + (reach - p.spine_half_width) * u
            yy = y0 - p.rib_rise * 4 * u * (1 - u) + droop * u**3
            if p.fracture is not None and p.fracture[0] == side and p.fracture[1] == k:
                _, _, at, step = p.fracture
                yy = yy + np.where(u > at, step, 0.0)
                callus = (
                    0.5 + side * (p.spine_half_width + (reach - p.spine_half_width) * at),
                    float(np.interp(at, u, yy)),
                )
                db.polygon(cv.px(_ellipse(*callus, p.rib_thickness, p.rib_thickness * 0.9, n=16)), fill=1.2)
            # anterior rib: fainter, from the lateral end down towards the sternum
            end = (d[-1], yy[-1])
            ant = np.array(
                [
                    [0.5 + side * end[0], end[1]],
                    [0.5 + side * (end[0] - 0.1), end[1] + 0.06],
                    [0.5 + side * 0.14, end[1] + 0.1],
                ]
            )
            db.line(cv.px(ant), fill=0.45, width=max(1, rib_w - 1), joint="curve")
            db.line(cv.px(np.stack([0.5 + side * d, yy], axis=1)), fill=1.0, width=rib_w, joint="curve")
    clav_w = cv.width(p.clavicle_thickness)
    for side, angle in zip((-1, 1), p.clavicle_angles, strict=True):
        a = math.radians(angle)
        t = np.linspace(0.0, 1.0, 10)
        dist = 0.035 + p.clavicle_length * t * math.cos(a)
        yy = p.clavicle_y - p.clavicle_length * t * math.sin(a) + 0.012 * np.sin(2 * math.pi * t)
        db.line(cv.px(np.stack([0.5 + side * dist, yy], axis=1)), fill=1.0, width=clav_w, joint="curve")
        db.polygon(cv.px(_ellipse(0.5 + side * (tw + 0.07), sy + 0.1, 0.065, 0.07)), fill=0.85)

    # fine detail inside the lungs: vessels and calcified granulomas (clipped to the lung fields)
    detail, dd = cv.layer()
    for pts, width in _vessel_tree(p):
        dd.line(cv.px(pts), fill=1.0, width=cv.width(width), joint="curve")
    for gx, gy, r in p.granulomas:
        dd.polygon(cv.px(_ellipse(gx, gy, r, r, n=12)), fill=3.0)

    # breast shadows and devices: additive extras
    extra, de = cv.layer()
    if p.breast > 0:  # concentric steps: a soft-edged shadow without a float blur of its own
        for side in (-1, 1):
            base = p.right_lung.base_y if side < 0 else p.left_lung.base_y
            for step in range(1, 5):
                r = 1.0 - 0.18 * (step - 1)
                de.polygon(
                    cv.px(_ellipse(0.5 + side * 0.24, base - 0.05, 0.17 * r, 0.12 * r)),
                    fill=p.breast * step / 4,
                )
    metal, dmt = cv.layer()
    if p.sternotomy:
        for y in np.linspace(0.3, 0.58, 5):
            dmt.ellipse(
                _bbox(cv.px(np.array([[0.5, y]]))[0], 0.012 * size, 0.007 * size),
                outline=1.0,
                width=cv.width(0.005),
            )
    _draw_devices(study, rng, cv, dmt)

    lungs = np.asarray(mask, dtype=np.float32) * (1.0 / 255.0)
    atten = (
        0.62 * np.asarray(soft)
        + 0.32 * np.asarray(bone)
        + 0.22 * np.asarray(detail) * lungs
        + np.asarray(extra)
        + 1.2 * np.asarray(metal)
    )
    img = _gaussian_blur(atten.astype(np.float32), study.blur * size / 256.0) * np.float32(1.0 / 1.25)
    np.clip(img, 0.0, 1.0, out=img)
    img = img**study.gamma * study.contrast + study.offset
    img += (study.gradient * (np.arange(size, dtype=np.float32) / size - 0.5))[:, None]
    img += rng.normal(0.0, study.noise, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _bbox(center: tuple[float, float], rx: float, ry: float) -> tuple[float, float, float, float]:
    x, y = center
    return (x - rx, y - ry, x + rx, y + ry)


def _draw_devices(study: _Study, rng: np.random.Generator, cv: _Canvas, draw: ImageDraw.ImageDraw) -> None:
    """Study-level hardware: ECG electrodes and leads, a central line, a pacemaker, a side marker."""
    size = cv.size
    if study.ecg:
        for _ in range(int(rng.integers(3, 6))):
            c = np.array([rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.8)])
            center = cv.px(c[None])[0]
            draw.ellipse(_bbox(center, 0.014 * size, 0.014 * size), outline=1.0, width=cv.width(0.005))
            end = np.array([rng.choice([-0.1, 1.1]), rng.uniform(0.0, 1.0)])
            mid = (c + end) / 2 + rng.normal(0, 0.08, 2)
            draw.line(cv.px(np.array([c, mid, end])), fill=0.6, width=cv.width(0.004), joint="curve")
    if study.line:
        side = rng.choice([-1, 1])
        pts = np.array(
            [[0.5 + side * 0.32, 0.1], [0.5 + side * 0.2, 0.16], [0.5 + side * 0.06, 0.22], [0.48, 0.36]]
        )
        draw.line(cv.px(pts + rng.normal(0, 0.01, pts.shape)), fill=0.8, width=cv.width(0.006), joint="curve")
    if study.pacemaker:
        side = rng.choice([-1, 1])
        c = np.array([0.5 + side * rng.uniform(0.22, 0.3), rng.uniform(0.17, 0.24)])
        box = _ellipse(c[0], c[1], 0.045, 0.03, rng.uniform(-0.3, 0.3), n=24)
        draw.polygon(cv.px(box), fill=1.6)
        lead = np.array([c, [0.5 + side * 0.08, 0.28], [0.5, 0.45], [0.54, 0.62]])
        draw.line(cv.px(lead), fill=1.0, width=cv.width(0.006), joint="curve")
    if study.marker >= 0:
        x = 0.08 if study.marker in (0, 3) else 0.88
        y = 0.08 if study.marker in (0, 1) else 0.88
        # not posed: markers are placed on the detector, not on the patient
        draw.rectangle((x * size, y * size, (x + 0.04) * size, (y + 0.05) * size), fill=1.5)


# --------------------------------------------------------------------------------------------------
# sets on disk


def write_phantom_set(
    out_dir: str | os.PathLike,
    n_patients: int,
    studies_per_patient: int,
    *,
    size: int = 256,
    fmt: str = "png",
    seed: int = 0,
) -> Path:
    """Write a phantom data set (images + manifest.csv) and return the manifest's path.

    Layout: ``out_dir/images/<patient_id>/<k>.png|.dcm``; the manifest has columns
    path,patient_id,view,sex,age,offset_days,split with paths relative to ``out_dir``. Splits are
    patient-disjoint (about 70/15/15 train/val/test). ``fmt="dicom"`` writes 16-bit MONOCHROME2 CR
    files with PatientID = the phantom id, deterministic UIDs and ViewPosition PA; ``fmt="png"`` writes
    16-bit greyscale PNGs. Same arguments, same files.
    """
    if fmt not in ("png", "dicom"):
        raise ValueError(f"fmt must be 'png' or 'dicom', got {fmt!r}")
    if not 1 <= n_patients <= _MAX_PATIENTS_PER_SET:
        raise ValueError(f"n_patients must be in 1..{_MAX_PATIENTS_PER_SET}, got {n_patients}")
    if studies_per_patient < 1:
        raise ValueError(f"studies_per_patient must be >= 1, got {studies_per_patient}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([_TAG_SET, seed])
    order = rng.permutation(n_patients)
    n_train = math.ceil(0.7 * n_patients)
    n_val = round(0.15 * n_patients)
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[int(idx)] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")

    rows = []
    ext = "png" if fmt == "png" else "dcm"
    for i in range(n_patients):
        patient = make_patient(seed * _MAX_PATIENTS_PER_SET + i)
        folder = out / "images" / patient.patient_id
        folder.mkdir(parents=True, exist_ok=True)
        offsets = np.concatenate([[0], np.cumsum(rng.integers(7, 900, studies_per_patient - 1))])
        for k in range(studies_per_patient):
            offset_days = int(offsets[k])
            age = patient.age + offset_days // 365
            pixels = render_study(patient, k, size)
            path = folder / f"{k}.{ext}"
            if fmt == "png":
                Image.fromarray(_to_uint16(pixels)).save(path)
            else:
                _write_dicom(
                    path, pixels, patient, study_index=k, age=age, offset_days=offset_days, seed=seed
                )
            rows.append(
                {
                    "path": path.relative_to(out).as_posix(),
                    "patient_id": patient.patient_id,
                    "view": "PA",
                    "sex": patient.sex,
                    "age": age,
                    "offset_days": offset_days,
                    "split": split_of[i],
                }
            )
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %d phantom images of %d patients (%s) to %s", len(rows), n_patients, fmt, out)
    return manifest


def _to_uint16(pixels: np.ndarray) -> np.ndarray:
    return np.round(np.clip(pixels, 0.0, 1.0) * 65535.0).astype(np.uint16)


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    patient: PhantomSpec,
    *,
    study_index: int,
    age: int,
    offset_days: int,
    seed: int,
) -> None:
    """A minimal but valid CR object; UIDs derive from the set seed so reruns give identical files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(kind: str) -> str:
        return generate_uid(
            entropy_srcs=["cxr-reid-phantom", str(seed), patient.patient_id, str(study_index), kind]
        )

    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    study_date = (_BASE_STUDY_DATE + timedelta(days=offset_days)).strftime("%Y%m%d")
    ds.SOPClassUID = _CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.Modality = "CR"
    ds.Manufacturer = "cxr-reid phantom generator"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.StudyDescription = "SYNTHETIC PHANTOM"
    ds.ImageComments = "Synthetic phantom, not a patient image"
    ds.PatientName = f"PHANTOM^{patient.patient_id}"
    ds.PatientID = patient.patient_id
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{min(age, 999):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyID = str(study_index)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    spacing = round(_FIELD_OF_VIEW_MM / pixels.shape[0], 6)
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelData = _to_uint16(pixels).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
