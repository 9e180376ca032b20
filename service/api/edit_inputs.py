"""An edit's input image and mask: read from the request, checked, and kept for the worker.

Clients send images base64-encoded (``/generate``: a JSON string, plain or a ``data:`` URL) or as
files (``/v1/images/edits``). Everything a client sends is checked here before any job exists:
the byte count before decoding the base64 (413 above ``CLUSCA_MAX_INPUT_BYTES``), the format
(PNG, JPEG or WebP) and the pixel count from the header before decoding the pixels (so a small
file that unpacks into a huge image is refused, never decoded), then the pixels themselves
(truncated or corrupt: 422). A mask must have its image's size. The checked pixels are encoded
again as PNG (RGB for the image, a black-and-white mask with white = repaint), and those bytes
are what the worker gets (:mod:`service.outputs.inputs`); the request names them by digest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import anyio
from PIL import Image, UnidentifiedImageError

from service.outputs import inputs
from service.outputs.store import NotKept
from service.settings import Settings
from service.api.deps import Services
from service.api.errors import ApiError

FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)


def _bad(field: str, message: str, status: int = 422) -> ApiError:
    code = "validation_error" if status == 422 else "input_too_large"
    return ApiError(status, code, f"{field}: {message}", param=field, fields=[{"field": field, "message": message}])


@dataclass(frozen=True)
class EditInput:
    """One checked input, as the PNG the worker will read, named by its digest."""

    png: bytes
    width: int
    height: int
    digest: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", inputs.digest_of(self.png))


@dataclass(frozen=True)
class EditInputs:
    """An edit's image and, for inpainting, its mask (white = repaint), of equal size."""

    image: EditInput
    mask: EditInput | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.width, self.image.height


def from_base64(field: str, value: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or ``data:`` URL; 413 when they would exceed ``max_bytes``
    (known from the length, before decoding), 422 when it is not base64."""
    payload = value
    m = _DATA_URL.match(value)
    if m:
        media, params = m.group(1).lower(), m.group(2).lower().split(";")
        if "base64" not in params:
            raise _bad(field, "a data: URL must be base64-encoded (data:image/png;base64,...)")
        if media and not media.startswith("image/"):
            raise _bad(field, f"a data: URL of {media!r}; expected an image (image/png, image/jpeg, image/webp)")
        payload = value[m.end():]
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise _bad(field, f"is about {len(payload) // 4 * 3} bytes; the limit is {max_bytes} "
                          "(CLUSCA_MAX_INPUT_BYTES)", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(field, "is not base64 (send the image's bytes base64-encoded, or a data: URL)") from None
    return check_bytes(field, data, max_bytes)


def check_bytes(field: str, data: bytes, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise _bad(field, f"is {len(data)} bytes; the limit is {max_bytes} (CLUSCA_MAX_INPUT_BYTES)", 413)
    if not data:
        raise _bad(field, "is empty; expected a PNG, JPEG or WebP image")
    return data


def _open(field: str, data: bytes, max_pixels: int) -> Image.Image:
    """The decoded image, once its header says it is a PNG, JPEG or WebP of at most ``max_pixels``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise _bad(field, f"declares a size too large to decode; the service decodes at most {max_pixels} "
                              "pixels (CLUSCA_MAX_PIXELS)") from None
        except UnidentifiedImageError:
            raise _bad(field, "is not a PNG, JPEG or WebP image (or its header is damaged)") from None
        except (OSError, ValueError, SyntaxError):
            raise _bad(field, "is not a readable PNG, JPEG or WebP image") from None
        w, h = im.size
        if w * h > max_pixels:
            raise _bad(field, f"is {w}x{h}, {w * h} pixels; the service decodes at most {max_pixels} "
                              "(CLUSCA_MAX_PIXELS)")
        try:
            im.load()
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning,
                Image.DecompressionBombError):
            raise _bad(field, "is truncated or corrupt; it could not be decoded") from None
    return im


def _png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG", compress_level=1)
    return out.getvalue()


def decode_image(field: str, data: bytes, max_pixels: int) -> EditInput:
    im = _open(field, data, max_pixels).convert("RGB")
    return EditInput(_png(im), im.width, im.height)


def decode_mask(field: str, data: bytes, max_pixels: int, alpha: bool = False) -> EditInput:
    """A mask as white = repaint, black = keep. ``alpha``: OpenAI's convention, where the
    transparent pixels (alpha below one half) are the ones to edit and colour means nothing."""
    im = _open(field, data, max_pixels)
    if alpha:
        if "A" not in im.getbands() and "transparency" not in im.info:
            raise _bad(field, "has no alpha channel; on this endpoint the mask's transparent pixels mark "
                              "what to edit (a PNG with transparency)")
        repaint = im.convert("RGBA").getchannel("A").point(lambda a: 255 if a < 128 else 0)
    else:
        repaint = im.convert("L").point(lambda v: 255 if v >= 128 else 0)
    return EditInput(_png(repaint), im.width, im.height)


def _check_pair(image: EditInput, mask: EditInput | None, mask_field: str) -> EditInputs:
    if mask is not None and (mask.width, mask.height) != (image.width, image.height):
        raise _bad(mask_field, f"is {mask.width}x{mask.height}; it must have the image's size, "
                               f"{image.width}x{image.height}")
    return EditInputs(image, mask)


async def read_edit(settings: Settings, image: str | None, mask: str | None) -> EditInputs | None:
    """``/generate``'s base64 ``image`` and ``mask`` (white = repaint), checked; None without an image."""
    if image is None:
        if mask is not None:
            raise _bad("mask", "needs an image to edit (image)")
        return None
    limit, pixels = settings.max_input_bytes, settings.max_pixels
    image_bytes = from_base64("image", image, limit)
    mask_bytes = from_base64("mask", mask, limit) if mask is not None else None
    return await anyio.to_thread.run_sync(lambda: _check_pair(
        decode_image("image", image_bytes, pixels),
        decode_mask("mask", mask_bytes, pixels) if mask_bytes is not None else None, "mask"))


async def read_edit_files(settings: Settings, image: bytes, mask: bytes | None,
                          image_field: str = "image") -> EditInputs:
    """Uploaded files (OpenAI's ``images.edit``): the mask in OpenAI's alpha convention."""
    limit, pixels = settings.max_input_bytes, settings.max_pixels
    check_bytes(image_field, image, limit)
    if mask is not None:
        check_bytes("mask", mask, limit)
    return await anyio.to_thread.run_sync(lambda: _check_pair(
        decode_image(image_field, image, pixels),
        decode_mask("mask", mask, pixels, alpha=True) if mask is not None else None, "mask"))


async def keep_edit(services: Services, model: str, edit: EditInputs | None) -> None:
    """Store the inputs where the worker reads them (before the job is queued)."""
    if edit is None:
        return
    store, queue = services.videos, services.queue
    for item in (edit.image, edit.mask):
        if item is None:
            continue
        if store.kind == "dir":
            try:
                await asyncio.to_thread(inputs.keep_in_folder, store, item.digest, item.png)
            except NotKept:
                raise ApiError(503, "unavailable", "the input image could not be stored (see CLUSCA_VIDEO_STORE); "
                               "retry later", headers={"Retry-After": "2"}) from None
        else:
            try:
                store.put(item.digest[:32], 0, item.png, "png")  # the Redis store's own cap on what it keeps
            except NotKept as exc:
                field = "image" if item is edit.image else "mask"
                raise _bad(field, f"decodes to {len(item.png)} bytes of PNG, more than Redis keeps: {exc}", 413) \
                    from None
            await queue.put_input(model, item.digest, item.png)
