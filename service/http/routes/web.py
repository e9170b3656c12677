"""The web page at `/`: one HTML file, two script modules and one stylesheet, served from the
package (`service/http/static/`), no build step, nothing fetched from elsewhere (offline).

`build_app` includes `router`, so the page is there under uvicorn and Ray Serve alike. None of
these routes is in the OpenAPI schema. The page talks to the public API only (`/info`,
`/classes`, `/generate/stream`), under a strict Content-Security-Policy: no inline script or
style, images from `data:` URLs, requests to this origin only.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",  # an ES module: imports api.js
    "api.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
COMMON_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate: a new release's page is never half old
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _read() -> dict[str, bytes]:
    """The page's files, read once from the installed package."""
    static = files("service.http").joinpath("static")
    return {name: static.joinpath(name).read_bytes() for name in MEDIA_TYPES}


FILES = _read()
router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def index() -> Response:
    """The page (its script asks `/info` and `/classes` for the model)."""
    headers = COMMON_HEADERS | {"Content-Security-Policy": CSP}
    return Response(FILES["index.html"], media_type=MEDIA_TYPES["index.html"], headers=headers)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    """The page's scripts and stylesheet."""
    if name not in FILES or name == "index.html":
        raise HTTPException(404, f"no static file {name!r}")
    return Response(FILES[name], media_type=MEDIA_TYPES[name], headers=COMMON_HEADERS)
