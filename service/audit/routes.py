"""GET /v1/predictions/{id}: the audit record of an earlier prediction."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..errors import ServiceError

router = APIRouter(prefix="/v1", tags=["audit"])


@router.get("/predictions/{prediction_id}", summary="The audit record of an earlier prediction")
async def get_prediction(request: Request, prediction_id: str) -> dict[str, Any]:
    service = request.app.state.service
    record = None
    if len(prediction_id) <= 64 and prediction_id.isalnum():
        record = await service.in_pool(service.audit.get, prediction_id)
    if record is None:
        raise ServiceError(404, "prediction_not_found", f"no prediction with id {prediction_id[:64]!r} "
                           "(never made, expired from the audit store, or auditing is disabled)")
    return record
