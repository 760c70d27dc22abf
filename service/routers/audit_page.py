"""GET /audit/: the auditor's page — static files shipped in the package (``service/static/audit``), no CDN.

The page itself holds no data, so it is served without the API key; everything it shows comes from the API,
which the page calls with the key the user typed (``X-API-Key``, kept in the tab's session storage). Every
file leaves with a Content-Security-Policy that lets the page reach its own origin only, so a browser refuses
any outside request even if one slipped in. ``/audit/colormaps.json`` hands the page the same colour tables
that the server-side overlays use (service/overlay.py).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from ..overlay import COLORMAPS, DEFAULT_COLORMAP, colormap_table

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "audit"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["audit page"], include_in_schema=False)


class PageFiles(StaticFiles):
    """Starlette's static files, each answered with :data:`PAGE_HEADERS`."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(PAGE_HEADERS)
        return response


@lru_cache(maxsize=1)
def _colormaps() -> dict[str, object]:
    return {"default": DEFAULT_COLORMAP, "colormaps": {name: colormap_table(name).tolist() for name in COLORMAPS}}


@router.get("/audit", summary="The auditor's page")
async def audit_page_redirect() -> RedirectResponse:
    return RedirectResponse("audit/", status_code=308)  # relative: right behind a path prefix too


@router.get("/audit/colormaps.json", summary="Colour tables for mask overlays")
async def colormaps() -> JSONResponse:
    return JSONResponse(_colormaps(), headers=PAGE_HEADERS)


def install(app: FastAPI) -> None:
    """Add the page to ``app``: its routes first, then the static files under ``/audit/``."""
    app.include_router(router)
    app.mount("/audit", PageFiles(directory=STATIC_DIR, html=True), name="audit-page")
