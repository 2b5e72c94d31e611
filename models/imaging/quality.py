"""The input quality gate: a decoded image with no usable content (too small, a strip, blank or nearly
constant) is refused before the service embeds it, since all such images would match each other.
``bench/quality_gate.py`` counts what it refuses on real sets.
"""

from __future__ import annotations

import numpy as np

from models.imaging.radiograph import ImageDecodeError, Radiograph

#: What an image must have to be embedded by the service (``check_usable``): anything less has no
#: anatomy to tell patients apart by, and all such images would match each other.
MIN_SIDE = 32  # pixels on the shorter side; the smallest real set here is 64 x 64
MAX_ASPECT = 4.0  # longer side / shorter side; chest radiographs are near 1
MIN_GREY_LEVELS = 16  # distinct values in a sample of at most 256 x 256 pixels
_SAMPLE_SIDE = 256


def check_usable(image: Radiograph, name: str = "the image") -> None:
    """Refuse a decoded image with no usable content: too small, a strip, blank or nearly constant.

    The bar: every radiograph of the project's data sets and the DICOM test files pass; a blank or
    one-colour image, a 1 x 1 image or a 1 x 100000 strip does not.
    """
    height, width = image.shape
    short, long = min(height, width), max(height, width)
    if short < MIN_SIDE:
        raise ImageDecodeError(
            f"{name} is {height} x {width} pixels; a radiograph needs at least {MIN_SIDE} on each side"
        )
    if long > MAX_ASPECT * short:
        raise ImageDecodeError(
            f"{name} is {height} x {width} pixels, {long / short:.1f} times longer than wide; a "
            f"radiograph is at most {MAX_ASPECT:g} times"
        )
    step = max(1, -(-max(image.pixels.shape[:2]) // _SAMPLE_SIDE))
    levels = np.unique(image.pixels[::step, ::step]).size
    if levels < MIN_GREY_LEVELS:
        raise ImageDecodeError(
            f"{name} is blank or nearly constant ({levels} grey level(s)): there is no anatomy to identify a "
            "patient by"
        )
