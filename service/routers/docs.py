"""Self-hosted API docs: ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) with every script, stylesheet and icon
served by the app itself, so the pages work on an offline or air-gapped host.

The assets come from the PyPI package ``fastapi-offline``, which ships the Swagger UI and ReDoc bundles that
FastAPI otherwise loads from a CDN; we use only its files (the HTML is FastAPI's own). Chosen over
``swagger-ui-bundle`` because it ships ReDoc as well, and it depends on nothing but FastAPI.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs-assets"
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="Macula API",
                               swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
                               swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
                               swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
                               swagger_ui_parameters={"validatorUrl": None})  # no badge from validator.swagger.io


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title="Macula API",
                          redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
                          redoc_favicon_url=f"{ASSETS_PATH}/favicon.png", with_google_fonts=False)


def install(app: FastAPI) -> None:
    """Add /docs, /redoc and their assets to ``app`` (build the app with ``docs_url=None, redoc_url=None``)."""
    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
