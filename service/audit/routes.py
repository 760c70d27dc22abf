"""The audit routes: search, export, one record, its kept input images.

``GET /v1/predictions`` (a page of summaries, newest first), ``GET /v1/predictions/export`` (the same selection,
streamed as JSON lines or CSV), ``GET /v1/predictions/{id}`` (the full record) and
``GET /v1/predictions/{id}/images/{n}`` (the kept input).
The store's exceptions are in the app's one error table (``service/errors.py``): ``StoreUnavailable`` → 503
``audit_unavailable``, ``InvalidQuery`` → 422 ``invalid_parameter``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..deps import service_of
from ..errors import ServiceError, responses
from ..routers.query import strict
from .interface import Summary
from .query import DEFAULT_LIMIT, MAX_IMAGE_INDEX, MAX_LIMIT, Filters, parse_bool, parse_time
from .sql import EXPORT_PAGE
from .store import AuditStore

router = APIRouter(prefix="/v1", tags=["audit"])
CSV_COLUMNS = ("id", "created_at", "created_at_iso", "model", "version", "route", "image_count", "image", "label",
               "score", "input_kept", "masks_kept", "familiar")


FILTERS = ("model", "version", "label", "min_score", "max_score", "familiar", "since", "until")


def _store(request: Request) -> AuditStore:
    return service_of(request).audit


async def _filters(model: str | None = Query(None, max_length=200, description="model name"),
                   version: str | None = Query(None, max_length=64, description="model version (sha256[:12])"),
                   label: str | None = Query(None, max_length=200, description="top-1 label of any image"),
                   min_score: float | None = Query(None, description="top-1 score at least this (same image as label)"),
                   max_score: float | None = Query(None, description="top-1 score at most this: the unsure ones"),
                   familiar: str | None = Query(None, description="true|false: an image the model's unfamiliar-input "
                                                "detector accepted / flagged (same image as label)"),
                   since: str | None = Query(None, description="ISO 8601 or epoch seconds, inclusive"),
                   until: str | None = Query(None, description="ISO 8601 or epoch seconds, exclusive")) -> Filters:
    return Filters(model=model, version=version, label=label, min_score=min_score, max_score=max_score,
                   familiar=None if familiar is None else parse_bool(familiar, "familiar"),
                   since=None if since is None else parse_time(since, "since"),
                   until=None if until is None else parse_time(until, "until"))


@router.get("/predictions", summary="Search predictions, newest first (keyset-paginated)",
            dependencies=[strict(*FILTERS, "limit", "cursor")], responses=responses(401, 422, 503))
async def search(request: Request, filters: Filters = Depends(_filters),
                 limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                 cursor: str | None = Query(None, max_length=400, description="next_cursor of the previous page"),
                 ) -> dict[str, Any]:
    page = await run_in_threadpool(_store(request).search, filters, limit=limit, cursor=cursor)
    return {"items": [item.to_json() for item in page.items], "next_cursor": page.next_cursor}


EXPORT_CONTENT = {200: {"description": "one JSON object per prediction (jsonl) or one CSV row per image (csv)",
                        "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                                    "text/csv": {"schema": {"type": "string"}}}}}


@router.get("/predictions/export", summary="Stream every prediction a search selects (JSON lines or CSV)",
            dependencies=[strict(*FILTERS, "format")], response_class=StreamingResponse,
            responses={**EXPORT_CONTENT, **responses(401, 422, 503)})
async def export(request: Request, filters: Filters = Depends(_filters),
                 format: Literal["jsonl", "csv"] = Query("jsonl")) -> StreamingResponse:
    store = _store(request)
    first = await run_in_threadpool(store.search, filters, limit=EXPORT_PAGE)   # errors surface before the 200

    def summaries() -> Iterator[Summary]:
        yield from first.items
        cursor = first.next_cursor
        while cursor is not None:
            page = store.search(filters, limit=EXPORT_PAGE, cursor=cursor)
            yield from page.items
            cursor = page.next_cursor

    if format == "csv":
        return StreamingResponse(_csv_lines(summaries()), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": 'attachment; filename="predictions.csv"'})
    return StreamingResponse((json.dumps(s.to_json(), separators=(",", ":")) + "\n" for s in summaries()),
                             media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="predictions.jsonl"'})


def _csv_lines(summaries: Iterator[Summary]) -> Iterator[str]:
    """One CSV row per image (a prediction with three images gives three rows with the same id)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")

    def take(row: Sequence[Any]) -> str:
        writer.writerow(row)
        text = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return text

    yield take(CSV_COLUMNS)
    for s in summaries:
        iso = datetime.fromtimestamp(s.created_at, UTC).isoformat().replace("+00:00", "Z")
        head = (s.id, repr(s.created_at), iso, s.model_name or "", s.model_version or "", s.route or "",
                len(s.images))
        for image in s.images or ():
            yield take((*head, image.n, image.label or "", "" if image.score is None else repr(image.score),
                        str(image.input_kept).lower(), str(s.masks_kept).lower(),
                        "" if image.familiar is None else str(image.familiar).lower()))


def _valid_id(prediction_id: str) -> bool:
    return len(prediction_id) <= 64 and prediction_id.isalnum()


def _not_found(prediction_id: str) -> ServiceError:
    return ServiceError(404, "prediction_not_found", f"no prediction with id {prediction_id[:64]!r} "
                        "(never made, expired from the audit store, or auditing is disabled)")


@router.get("/predictions/{prediction_id}", summary="The audit record of an earlier prediction",
            responses=responses(401, 404, 503))
async def get_prediction(request: Request, prediction_id: str) -> dict[str, Any]:
    record = await run_in_threadpool(_store(request).get, prediction_id) if _valid_id(prediction_id) else None
    if record is None:
        raise _not_found(prediction_id)
    return record


IMAGE_TYPES = {200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}, **responses(401, 404, 422, 503)}


@router.get("/predictions/{prediction_id}/images/{n}", summary="The input image kept for a prediction",
            response_class=Response, responses=IMAGE_TYPES)
async def get_image(request: Request, prediction_id: str,
                    n: int = Path(ge=0, le=MAX_IMAGE_INDEX, description="which image of the prediction")) -> Response:
    store = _store(request)
    kept = await run_in_threadpool(store.kept_input, prediction_id, n) if _valid_id(prediction_id) else None
    if kept is None:
        if not _valid_id(prediction_id) or await run_in_threadpool(store.get, prediction_id) is None:
            raise _not_found(prediction_id)
        raise ServiceError(404, "image_not_found", f"prediction {prediction_id!r} has no kept input image {n} "
                           "(no such image, or MACULA_AUDIT_INPUTS=none when it was made)")
    return Response(kept.data, media_type=kept.media_type,
                    headers={"Cache-Control": "private, max-age=86400, immutable",
                             "X-Macula-Input-Kind": kept.kind})
