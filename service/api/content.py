"""Stored outputs as HTTP bodies, whole or as one byte range (RFC 9110 ``Range: bytes=...``)."""

from __future__ import annotations

import re

from fastapi.responses import Response

from service.outputs.store import Blob
from service.api.errors import ApiError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive ``(first, last)`` byte a ``Range`` header asks of ``size`` bytes; None when the
    header is not one this service serves (then the whole body is sent, as RFC 9110 allows);
    416 when it is well formed but asks nothing the body has."""
    m = _RANGE.match(header.strip().replace(" ", ""))
    if not m or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # the last N bytes
        n = int(last)
        if n == 0:
            raise _unsatisfiable(size)
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> ApiError:
    return ApiError(416, "range_not_satisfiable", f"Range: the content is {size} bytes long", param="Range",
                    headers={"Content-Range": f"bytes */{size}"})


def content_response(data: bytes | Blob, media_type: str, range_header: str | None) -> Response:
    """``data`` as the answer: 200 with all of it, or 206 with the range asked for (a file is read
    only as far as that range)."""
    blob = data if isinstance(data, Blob) else Blob(len(data), data)
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=3600"}
    span = byte_range(range_header, blob.size) if range_header else None
    if span is None:
        return Response(blob.read(), media_type=media_type, headers=headers)
    first, last = span
    headers["Content-Range"] = f"bytes {first}-{last}/{blob.size}"
    return Response(blob.read(first, last), status_code=206, media_type=media_type, headers=headers)
