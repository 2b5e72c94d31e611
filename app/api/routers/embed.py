"""POST /embed: images to identity embeddings."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, File, Query, UploadFile

from app.api.dependencies import ServiceDep, SettingsDep, collect_files, read_uploads
from app.api.schemas import EmbedResponse, EmbedResult, ImageSize, error_responses
from app.service.errors import InvalidInputError

router = APIRouter(tags=["embed"])


def encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    """A float32 vector as a JSON list, or as base64 of its little-endian float32 bytes."""
    values = np.asarray(vector, dtype="<f4")
    if encoding == "base64":
        return base64.b64encode(values.tobytes()).decode("ascii")
    return values.tolist()


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Embed one or more radiographs",
    description=(
        "Upload a DICOM, PNG, JPEG or TIFF as `file`, or several as `files`. Each result holds the "
        "unit-norm float32 embedding (a JSON list, or base64 of little-endian float32 with "
        "`?encoding=base64`), the model id, the image size and the DICOM identifiers found "
        "(SOPInstanceUID, StudyInstanceUID, ViewPosition; never names, birth dates or the PatientID). "
        "One unusable file fails the whole request (422) and nothing is returned for the others."
    ),
    responses=error_responses(413),
)
def embed_images(
    service: ServiceDep,
    settings: SettingsDep,
    file: Annotated[UploadFile | None, File(description="one image")] = None,
    files: Annotated[list[UploadFile] | None, File(description="several images")] = None,
    encoding: Annotated[Literal["json", "base64"], Query(description="embedding encoding")] = "json",
) -> EmbedResponse:
    uploads = read_uploads(collect_files(file, files), settings)
    if not uploads:
        raise InvalidInputError("send an image as the multipart field 'file' (or several as 'files')")
    decoded, vectors = service.embed_uploads(uploads)
    results = [
        EmbedResult(
            filename=image.filename,
            model_id=service.model_id,
            dim=int(vector.shape[0]),
            encoding=encoding,
            embedding=encode_vector(vector, encoding),
            image_size=ImageSize(width=image.width, height=image.height),
            source_format=image.source_format,
            identifiers=image.public_identifiers(),
        )
        for image, vector in zip(decoded, vectors, strict=True)
    ]
    return EmbedResponse(model_id=service.model_id, results=results)
