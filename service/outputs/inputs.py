"""Where an edit's inputs (its image and mask) wait for the worker that runs the job.

The API decodes and checks an input, encodes it again as PNG and keeps those bytes where videos
are kept (``CLUSCA_VIDEO_STORE``): in Redis beside the model's jobs (``clusca:{T}:input:<sha256>``,
with the result TTL), or as a file in the shared folder (swept with the videos after the TTL). The
job's request names an input only by the SHA-256 of its bytes, so the job's JSON stays small
whatever the image, an identical input is kept once, and the worker checks that what it reads is
what the API wrote. Inputs are never logged.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from service.outputs.store import REF_PREFIX, Store


def digest_of(data: bytes) -> str:
    """The name of an input in a request: the SHA-256 of its bytes, in hex."""
    return hashlib.sha256(data).hexdigest()


def file_ref(digest: str) -> bytes:
    """The folder store's reference of an input (a name the store's sweep knows)."""
    return REF_PREFIX + f"{digest[:32]}-0-{digest[32:44]}.png".encode()


def keep_in_folder(store: Store, digest: str, data: bytes) -> None:
    """Write an input into a folder store (``store.kind == "dir"``); raises ``NotKept``."""
    store.write(file_ref(digest)[len(REF_PREFIX):].decode(), data)  # type: ignore[attr-defined]


def read_input(store: Store, digest: str, from_redis: Callable[[], bytes | None]) -> bytes | None:
    """The input named ``digest``: from the folder when ``store`` is one, else ``from_redis()``;
    None when it is gone (expired) or is not the bytes it is named by."""
    if store.kind == "dir":
        blob = store.open(file_ref(digest))
        data = blob.read() if blob is not None else None
    else:
        data = from_redis()
    return data if data is not None and digest_of(data) == digest else None
