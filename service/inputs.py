"""Getting image bytes out of a request: multipart parts, a raw image body, or JSON base64.

No field ever names a path or URL: images arrive in the body only.
"""

from __future__ import annotations

import json
from contextlib import aclosing

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .codec import ALLOWED_CONTENT_TYPES, decode_base64
from .errors import bad_request, too_many_images, unsupported


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_images(request: Request, *, field: str, max_images: int, max_bytes: int,
                      sniff_untyped: bool = False) -> list[bytes]:
    """The request's images in order. 400 malformed / none, 415 wrong content type, 413 too many / too large.

    ``sniff_untyped``: a body without Content-Type (or ``application/octet-stream``) is taken as one image whose
    format the codec tells from its bytes, as TorchServe does (``curl URL -T kitten.jpg`` sends no Content-Type).
    """
    media = _media_type(request)
    if media == "multipart/form-data":
        blobs = await _multipart(request, field, max_images, max_bytes)
    elif media == "application/json":
        blobs = _json_images(await request.body())
    elif media in ALLOWED_CONTENT_TYPES or (sniff_untyped and media in ("", "application/octet-stream")):
        blobs = [await request.body()]
    elif media.startswith("image/"):
        raise unsupported(f"Content-Type {media} is not accepted; send image/jpeg, image/png or image/webp")
    else:
        raise unsupported(f"send multipart/form-data (parts named {field!r}), a raw image body "
                          f"(image/jpeg|png|webp) or JSON {{\"images\": [base64, ...]}}; got {media or 'nothing'}")
    if not blobs:
        raise bad_request(f"no images in the request (multipart parts must be named {field!r})")
    if len(blobs) > max_images:
        raise too_many_images(f"{len(blobs)} images in one request; the limit is {max_images}")
    if any(not b for b in blobs):
        raise bad_request("empty image")
    return blobs


async def _multipart(request: Request, field: str, max_images: int, max_bytes: int) -> list[bytes]:
    try:  # Starlette's parser itself: request.form() would turn every MultiPartException into a plain 400
        async with aclosing(request.stream()) as stream:
            parser = MultiPartParser(request.headers, stream, max_files=max_images, max_fields=max_images + 16,
                                     max_part_size=max_bytes)
            form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith(("Too many files", "Too many fields")):  # Starlette stops counting there
            raise too_many_images(f"more than {max_images} parts in the multipart body; the limit is "
                                  f"{max_images} images per request") from None
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
