"""HTML-form bodies as the JSON the routes validate, for the routes OpenAI's SDKs send forms to.

The OpenAI SDK sends ``videos.create`` as ``multipart/form-data`` (it can carry an image), one
text part per field; fields it was given as objects or lists (``extra_body``) arrive flattened
the way its query strings are, ``cache[preset]`` and ``tags[]``. This ASGI middleware turns such
a body into the equivalent JSON object before routing, so one pydantic model checks both, with
the same 422s naming the field. Values stay strings; the model's lax parsing reads numbers and
booleans from them, as it does from JSON. It runs inside the body limits, on a body already read
whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl

from .. import metrics
from .errors import error_response
from .middleware import replay

Scope = dict[str, Any]
_CLASH = "clashes with another field of that name (a value, an object and a list at once)"
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class FormError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class FormPart:
    """One field of a form: text (``value``), or a file (``data``, with the type its part declares)."""

    name: str
    value: str = ""
    is_file: bool = False
    data: bytes = b""
    content_type: str = ""


def form_parts(content_type: str, body: bytes) -> list[FormPart]:
    """Each field of a ``multipart/form-data`` or ``application/x-www-form-urlencoded`` body, in order."""
    if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        try:
            return [FormPart(k, v) for k, v in parse_qsl(body.decode(), keep_blank_values=True)]
        except UnicodeDecodeError:
            raise FormError("body", "the form is not UTF-8") from None
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\nMIME-Version: 1.0\r\n\r\n"
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart() or not message.get_boundary():
        raise FormError("body", "the multipart body has no boundary (Content-Type: multipart/form-data; boundary=...)")
    parts = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise FormError("body", "a form part has no name (Content-Disposition: form-data; name=...)")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            declared = part.get("content-type")
            parts.append(FormPart(str(name), is_file=True, data=payload,
                                  content_type=part.get_content_type() if declared else ""))
            continue
        try:
            value = payload.decode(part.get_content_charset() or "utf-8")
        except (LookupError, UnicodeDecodeError):
            raise FormError(str(name), "is not UTF-8 text") from None
        parts.append(FormPart(str(name), value))
    return parts


def form_fields(content_type: str, body: bytes) -> list[tuple[str, str, bool]]:
    """``(name, value, is_file)`` of each field of a form body, in order (a file's value is empty)."""
    return [(p.name, p.value, p.is_file) for p in form_parts(content_type, body)]


def as_object(fields: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Form fields as one JSON object: ``a[b]`` nests, ``a[]`` appends to a list; an empty value is
    an absent field (the SDK leaves out what it was not given)."""
    out: dict[str, Any] = {}
    for name, value in fields:
        if value == "":
            continue
        m = _KEY.match(name)
        if not m:
            raise FormError(name, "is not a form field name (use name, name[key] or name[])")
        path = [m.group(1)] + re.findall(r"\[([^\[\]]*)\]", m.group(2))
        here: Any = out
        for i, key in enumerate(path):
            last = i == len(path) - 1
            appends = i + 1 < len(path) and path[i + 1] == ""
            if key == "":
                if not isinstance(here, list):
                    raise FormError(name, _CLASH)
                if last:
                    here.append(value)
                    break
                raise FormError(name, "nests inside a list item, which a form cannot spell")
            if not isinstance(here, dict):
                raise FormError(name, _CLASH)
            if last:
                here[key] = value
            else:
                here = here.setdefault(key, [] if appends else {})
    return out


class FormAsJson:
    """For ``POST`` to one of ``paths`` with a form body, hand the app that form as a JSON body.

    A file part is refused (422 naming it): no route taking forms here uses one; OpenAI's
    ``input_reference`` (an image to start the video from) is not something these models do.
    """

    def __init__(self, app: Callable, paths: Iterable[str]):
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        content_type = _header(scope, b"content-type")
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") not in self.paths
                or not content_type.lower().startswith(("multipart/form-data", "application/x-www-form-urlencoded"))):
            await self.app(scope, receive, send)
            return
        body = await _whole_body(receive)
        try:
            fields = form_fields(content_type, body)
            files = [name for name, _, is_file in fields if is_file]
            if files:
                raise FormError(files[0], "files are not accepted here: this service makes videos from text "
                                "alone (no input_reference image)" if files[0] == "input_reference"
                                else "must be a text field, not a file")
            data = json.dumps(as_object((name, value) for name, value, _ in fields)).encode()
        except FormError as exc:
            metrics.ERRORS.labels("validation").inc()
            message = f"{exc.field}: {exc}"
            answer = error_response(422, "validation_error", message, param=exc.field,
                                    fields=[{"field": exc.field, "message": str(exc)}])
            await answer(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await self.app({**scope, "headers": headers}, replay(data, receive), send)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


async def _whole_body(receive: Callable) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
