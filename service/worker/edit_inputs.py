"""An edit's inputs, read back for the call that runs it: the PNGs the API stored, as PIL images.

The API checked and re-encoded them (service/api/edit_inputs.py) and the request names them by
digest; they are read from where the API kept them (service/outputs/inputs.py). An input that
has expired, or whose bytes are not the ones named, fails its job with a reason.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

from PIL import Image

from service.broker.consumer import StartedJob, WorkerQueue, stored_input
from service.outputs.inputs import read_input
from service.outputs.store import Store

MISSING = "the input image of this edit is no longer stored (it expired with CLUSCA_RESULT_TTL_S); send it again"


def _image(q: WorkerQueue, store: Store, model: str, digest: str, mode: str) -> Image.Image | None:
    data = read_input(store, digest, lambda: stored_input(q, model, digest))
    if data is None:
        return None
    im = Image.open(io.BytesIO(data), formats=("PNG",))
    im.load()
    return im.convert(mode)


def load_inputs(q: WorkerQueue, store: Store, jobs: Sequence[StartedJob]) -> tuple[list[Any], list[StartedJob]]:
    """Each edit job's ``(image, mask or None)`` in order, and the jobs whose inputs are gone
    (left out of the first list)."""
    found: list[Any] = []
    gone: list[StartedJob] = []
    for j in jobs:
        r, model = j.request, j.delivery.model
        image = _image(q, store, model, r.image, "RGB") if r.image is not None else None
        mask = _image(q, store, model, r.mask, "L") if r.mask is not None else None
        if image is None or (r.mask is not None and mask is None):
            gone.append(j)
        else:
            found.append((image, mask))
    return found, gone
