"""``GET /``: where to go from the service's root.

A person who opens the bare address in a browser, or a script that asks it, should learn where the
API docs, the review page and the health checks are instead of getting a 404. A browser (Accept:
text/html) gets a small page of links; anything else JSON. It says nothing about the gallery, so it
needs no key, and like /review it is not part of the API schema.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

router = APIRouter(include_in_schema=False)

#: path -> what a person finds there
LINKS = {
    "/docs": "interactive API documentation (Swagger UI; /redoc for ReDoc, /openapi.json for the schema)",
    "/review": "review page: open wrong-patient alerts and conflicting patient labels",
    "/readyz": "readiness: model loaded and gallery consistent",
    "/healthz": "liveness",
}


def _page(version: str) -> str:
    items = "\n".join(
        f'<li><a href="{escape(path)}">{escape(path)}</a>: {escape(text)}</li>'
        for path, text in LINKS.items()
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>cxr-reid</title></head>\n'
        f"<body><h1>cxr-reid {escape(version)}</h1>\n"
        "<p>Chest X-ray patient re-identification service.</p>\n"
        f"<ul>\n{items}\n</ul></body></html>\n"
    )


@router.get("/")
def home(request: Request) -> Response:
    version = request.app.version
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(
            _page(version),
            headers={**headers, "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'"},
        )
    return JSONResponse(
        {"service": "cxr-reid", "version": version, "links": {path[1:]: path for path in LINKS}},
        headers=headers,
    )
