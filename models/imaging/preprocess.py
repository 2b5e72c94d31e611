"""File -> :class:`Radiograph` -> model input: the one path that defines what the network sees.

The input contract: any DICOM, PNG, JPEG or TIFF file (path or bytes) is decoded by
:func:`decode_image` into a :class:`Radiograph` (float32 grey pixels in display orientation, bone
bright; DICOM identifiers and pixel spacing kept), or refused with :class:`ImageDecodeError`, a
``ValueError`` whose message a person can act on (the HTTP layer turns it into a 4xx). The service
also refuses images with no usable content (:func:`check_usable`). :func:`prepare` then turns a
radiograph into the model's input as its :class:`PreprocessConfig` says (the contract stored in
every checkpoint), so training, evaluation and the service mean the same thing by it.

The work lives in rooms; this module re-exports their public names, and callers keep importing
from here:

- :mod:`models.imaging.radiograph`: :class:`Radiograph`, :class:`ImageDecodeError` and the pixel
  arithmetic the rooms share.
- :mod:`models.imaging.decode`: bytes -> :class:`Radiograph` (format sniffing, Pillow formats,
  :func:`header_pixels` for the decode budget); :mod:`models.imaging.decode_dicom`: DICOM pixel
  data -> :class:`Radiograph`, on top of :mod:`models.imaging.dicom`, the one DICOM reader.
- :mod:`models.imaging.quality`: the input quality gate.
- :mod:`models.imaging.prepare`: :class:`PreprocessConfig`, :func:`prepare`, :func:`to_tensor`,
  :func:`load_for_model`, test-time views.
"""

from __future__ import annotations

from models.imaging.decode import DECODE_BYTES_PER_PIXEL, decode_image, header_pixels, sniff_format
from models.imaging.decode_dicom import IDENTIFIER_KEYWORDS, RADIOGRAPH_MODALITIES
from models.imaging.prepare import (
    OVERSAMPLE,
    TTA_VIEWS,
    PreprocessConfig,
    equalize_histogram,
    load_for_model,
    prepare,
    to_tensor,
)
from models.imaging.quality import MAX_ASPECT, MIN_GREY_LEVELS, MIN_SIDE, check_usable
from models.imaging.radiograph import ImageDecodeError, Radiograph

__all__ = [
    "DECODE_BYTES_PER_PIXEL",
    "IDENTIFIER_KEYWORDS",
    "MAX_ASPECT",
    "MIN_GREY_LEVELS",
    "MIN_SIDE",
    "OVERSAMPLE",
    "RADIOGRAPH_MODALITIES",
    "TTA_VIEWS",
    "ImageDecodeError",
    "PreprocessConfig",
    "Radiograph",
    "check_usable",
    "decode_image",
    "equalize_histogram",
    "header_pixels",
    "load_for_model",
    "prepare",
    "sniff_format",
    "to_tensor",
]
