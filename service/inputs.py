"""Getting image bytes out of a request: multipart parts, a raw image body, or JSON base64.

No field ever names a path or URL: images arrive in the body only. The image count is checked while the body is
parsed, whatever the encoding, so a body with too many images is refused before any of them is decoded. A JSON
body is parsed in a worker thread by ijson (an incremental parser with a C backend), which lets the nesting depth
and the image count be checked while parsing: ``json.loads`` recurses in C and Python, fails on deep nesting with
a ``RecursionError``, and only returns once the whole document is built.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from contextlib import aclosing
from io import BytesIO

import ijson
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .codec import ALLOWED_CONTENT_TYPES

JSON_MAX_DEPTH = 8  # {"images": [...]} needs 2; room for a few unrelated fields (MACULA_JSON_MAX_DEPTH)
EXTRA_FORM_FIELDS = 16  # non-file form fields a multipart body may carry beside its images


class MalformedRequest(Exception):
    """The body is not what its Content-Type says, or holds no image."""


class WrongContentType(Exception):
    """The Content-Type is not one the route takes."""


class TooManyImages(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} images in one request; the limit is {limit}")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_images(request: Request, *, field: str, max_images: int, max_bytes: int,
                      max_depth: int = JSON_MAX_DEPTH, sniff_untyped: bool = False) -> list[bytes]:
    """The request's images in order.

    ``sniff_untyped``: a body without Content-Type (or ``application/octet-stream``) is taken as one image whose
    format the codec tells from its bytes, as TorchServe does (``curl URL -T kitten.jpg`` sends no Content-Type).
    """
    media = _media_type(request)
    if media == "multipart/form-data":
        blobs = await _multipart(request, field, max_images, max_bytes)
    elif media == "application/json":
        body = await request.body()
        blobs = await asyncio.to_thread(json_images, body, max_images=max_images, max_depth=max_depth)
    elif media in ALLOWED_CONTENT_TYPES or (sniff_untyped and media in ("", "application/octet-stream")):
        blobs = [await request.body()]
    elif media.startswith("image/"):
        raise WrongContentType(f"Content-Type {media} is not accepted; send image/jpeg, image/png or image/webp")
    else:
        raise WrongContentType(f"send multipart/form-data (parts named {field!r}), a raw image body "
                               f"(image/jpeg|png|webp) or JSON {{\"images\": [base64, ...]}}; got {media or 'nothing'}")
    if not blobs:
        raise MalformedRequest(f"no images in the request (multipart parts must be named {field!r})")
    if any(not b for b in blobs):
        raise MalformedRequest("empty image")
    return blobs


async def _multipart(request: Request, field: str, max_images: int, max_bytes: int) -> list[bytes]:
    max_fields = max_images + EXTRA_FORM_FIELDS
    try:  # Starlette's parser itself: request.form() would turn every MultiPartException into a plain 400
        async with aclosing(request.stream()) as stream:
            parser = MultiPartParser(request.headers, stream, max_files=max_images, max_fields=max_fields,
                                     max_part_size=max_bytes)
            form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):  # Starlette stops counting there
            raise TooManyImages(max_images) from None
        if exc.message.startswith("Too many fields"):  # form fields that are not files: not images
            raise MalformedRequest(f"malformed multipart body: more than {max_fields} form fields") from None
        raise MalformedRequest(f"malformed multipart body: {exc.message}") from None
    try:
        parts = form.getlist(field)
        return [await p.read() if isinstance(p, UploadFile) else p.encode() for p in parts]
    finally:
        await form.close()


def json_images(body: bytes, *, max_images: int, max_depth: int = JSON_MAX_DEPTH) -> list[bytes]:
    """``{"images": ["<base64 or data: URI>", ...]}`` → the decoded images; blocking (run it in a thread).

    Refuses, while parsing: nesting deeper than ``max_depth``, more than ``max_images`` entries, an entry that is
    not a string, a second ``images`` key."""
    images: list[bytes] | None = None
    depth, in_images, key = 0, False, None
    try:
        for event, value in ijson.basic_parse(BytesIO(body), use_float=True):
            if event in ("start_map", "start_array"):
                depth += 1
                if depth > max_depth:
                    raise MalformedRequest(f"JSON nested deeper than {max_depth} levels")
                if depth == 2 and key == "images":
                    if event != "start_array" or images is not None:
                        raise MalformedRequest('"images" must be given once, as a list')
                    images, in_images = [], True
                elif in_images:
                    raise MalformedRequest("each entry of 'images' must be a base64 string")
            elif event in ("end_map", "end_array"):
                depth -= 1
                in_images = in_images and depth >= 2
            elif event == "map_key" and depth == 1:
                key = value
            elif in_images and depth == 2:
                if event != "string":
                    raise MalformedRequest("each entry of 'images' must be a base64 string")
                if len(images) == max_images:
                    raise TooManyImages(max_images)
                images.append(decode_base64(value))
            elif depth == 0:
                raise MalformedRequest('JSON body must be {"images": ["<base64 or data: URI>", ...]}')
    except (ijson.JSONError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"body is not valid JSON: {str(exc)[:100]}") from None
    if images is None:
        raise MalformedRequest('JSON body must be {"images": ["<base64 or data: URI>", ...]}')
    return images


def decode_base64(text: str) -> bytes:
    """Strict base64 (or a ``data:image/...;base64,`` URI) → bytes."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise MalformedRequest("data: URIs must be base64 encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest("invalid base64 in 'images'") from None
