"""Getting image bytes out of a request: multipart parts, a raw image body, or JSON base64.

No field ever names a path or URL: images arrive in the body only.
"""

from __future__ import annotations

import json

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from .codec import ALLOWED_CONTENT_TYPES, decode_base64
from .errors import ServiceError, bad_request, unsupported


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_images(request: Request, *, field: str, max_images: int, max_bytes: int) -> list[bytes]:
    """The request's images in order. 400 malformed / none, 415 wrong content type, 413 via the body limit."""
    media = _media_type(request)
    if media == "multipart/form-data":
        blobs = await _multipart(request, field, max_images, max_bytes)
    elif media == "application/json":
        blobs = _json_images(await request.body())
    elif media in ALLOWED_CONTENT_TYPES or (media == "application/octet-stream" and field == "data"):
        blobs = [await request.body()]
    elif media.startswith("image/"):
        raise unsupported(f"Content-Type {media} is not accepted; send image/jpeg, image/png or image/webp")
    else:
        raise unsupported(f"send multipart/form-data (parts named {field!r}), a raw image body "
                          f"(image/jpeg|png|webp) or JSON {{\"images\": [base64, ...]}}; got {media or 'nothing'}")
    if not blobs:
        raise bad_request(f"no images in the request (multipart parts must be named {field!r})")
    if len(blobs) > max_images:
        raise ServiceError(413, "body_too_large", f"{len(blobs)} images in one request; the limit is {max_images}")
    if any(not b for b in blobs):
        raise bad_request("empty image")
    return blobs


async def _multipart(request: Request, field: str, max_images: int, max_bytes: int) -> list[bytes]:
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16, max_part_size=max_bytes)
    except MultiPartException as exc:
        raise bad_request(f"malformed multipart body: {exc.message}") from None
    try:
        parts = form.getlist(field)
        return [await p.read() if isinstance(p, UploadFile) else p.encode() for p in parts]
    finally:
        await form.close()


def _json_images(body: bytes) -> list[bytes]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("body is not valid JSON") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list):
        raise bad_request('JSON body must be {"images": ["<base64 or data: URI>", ...]}')
    return [decode_base64(item) for item in images]
