"""The auditor's view: ``GET /audit/``, a page of static files shipped in the package (``service/static/audit``,
no CDN), and ``GET /v1/predictions/{id}/overlay.png``, a mask drawn over the kept input by the server for
scripts, reports and tickets (service/overlay.py: the same geometry and colours as the page).

The page itself holds no data, so it is served without the API key; everything it shows comes from the API,
which the page calls with the key the user typed (``X-API-Key``, kept in the tab's session storage). Every
file leaves with a Content-Security-Policy that lets the page reach its own origin only, so a browser refuses
any outside request even if one slipped in. ``/audit/colormaps.json`` hands the page the same colour tables
that the server-side overlays use. The overlay route needs the key like every other /v1 route.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from .. import errors
from ..audit.query import MAX_IMAGE_INDEX
from ..deps import ServiceDep
from ..errors import ServiceError
from ..overlay import COLORMAPS, DEFAULT_COLORMAP, colormap_table, open_kept_input, record_overlay_png
from .query import strict

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "audit"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["audit page"], include_in_schema=False)
overlays = APIRouter(prefix="/v1", tags=["audit"])
Colormap = Literal[COLORMAPS]  # type: ignore[valid-type]


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


OVERLAY_PARAMETERS = ("image", "module", "alpha", "colormap", "stretch")


@overlays.get("/predictions/{prediction_id}/overlay.png", summary="An attention mask drawn over the kept input",
              response_class=Response, responses={200: {"content": {"image/png": {}}}},
              dependencies=[strict(*OVERLAY_PARAMETERS)])
async def overlay_png(service: ServiceDep, prediction_id: str,
                      image: int = Query(0, ge=0, le=MAX_IMAGE_INDEX, description="which image of the prediction"),
                      module: str | None = Query(None, max_length=200, description="attention module (default: "
                                                 "the last one); the record lists them in network order"),
                      alpha: float = Query(0.5, ge=0.0, le=1.0, description="mask opacity"),
                      colormap: Colormap = Query(DEFAULT_COLORMAP, description="colour map"),
                      stretch: bool = Query(False, description="spread the mask's min..max over the colours"),
                      ) -> Response:
    valid = len(prediction_id) <= 64 and prediction_id.isalnum()
    record = await run_in_threadpool(service.audit.get, prediction_id) if valid else None
    if record is None:
        raise ServiceError(404, "prediction_not_found", f"no prediction with id {prediction_id[:64]!r} "
                           "(never made, expired from the audit store, or auditing is disabled)")
    kept = await run_in_threadpool(service.audit.kept_input, prediction_id, image)
    if kept is None:
        raise ServiceError(404, "image_not_found", f"prediction {prediction_id!r} has no kept input image {image} "
                           "(no such image, or MACULA_AUDIT_INPUTS=none when it was made)")
    png = await run_in_threadpool(_render, record, kept.data, image, module, alpha, colormap, stretch)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


def _render(record: dict[str, Any], data: bytes, image: int, module: str | None, alpha: float, colormap: str,
            stretch: bool) -> bytes:
    return record_overlay_png(record, open_kept_input(data), image=image, module=module, alpha=alpha,
                              colormap=colormap, stretch=stretch)


def install(app: FastAPI, secured: Sequence[Any] = ()) -> None:
    """Add the overlay route (behind ``secured``), the page's routes, then its static files under ``/audit/``."""
    app.include_router(overlays, dependencies=list(secured), responses=errors.responses(401, 404, 422, 503))
    app.include_router(router)
    app.mount("/audit", PageFiles(directory=STATIC_DIR, html=True), name="audit-page")
