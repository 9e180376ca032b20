"""FastAPI dependencies: settings, the shared Redis-backed services, bearer auth."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.adapters.store import AdapterStore
from service.api.adapter_catalog import AdapterCatalog
from service.outputs import store as video_store
from service.broker.producer import JobQueue
from service.broker.reconcile import AckJournal
from service.registry import Registry
from service.settings import Settings, get_settings
from service.outputs.store import Store
from service.api.video_index import VideoIndex
from service.api.errors import ApiError


@dataclass
class Services:
    """What the app builds once at start-up and every request shares."""

    settings: Settings
    registry: Registry
    redis: Any
    queue: JobQueue
    journal: AckJournal = field(default_factory=AckJournal)
    videos: Store | None = None  # default: the one the settings name
    adapters: AdapterCatalog | None = None  # default: CLUSCA_ADAPTERS_DIR and the shipped adapters

    def __post_init__(self) -> None:
        if self.videos is None:
            self.videos = video_store.from_settings(self.settings)
        if self.adapters is None:
            store = AdapterStore(self.settings.adapters_dir, self.settings.adapter_max_bytes)
            self.adapters = AdapterCatalog(store, self.queue, self.registry.names)

    @property
    def video_index(self) -> VideoIndex:
        """Each caller's OpenAI-style videos, newest last (``GET /v1/videos``)."""
        return VideoIndex(self.redis, self.settings.result_ttl_s)


def get_services(request: Request) -> Services:
    return request.app.state.services


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServicesDep = Annotated[Services, Depends(get_services)]

_bearer = HTTPBearer(auto_error=False, description="One of CLUSCA_API_KEYS (only when keys are configured).")


def require_auth(services: ServicesDep,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """Check the bearer key; return an opaque caller identity (scopes idempotency keys).

    Every configured key is compared (constant time each, no early exit), and a
    failure says only "unauthorized": neither which part was wrong nor how many keys exist.
    """
    keys = services.settings.api_keys
    if not keys:
        return "anonymous"
    given = (creds.credentials if creds else "").encode()
    match = -1
    for i, key in enumerate(keys):
        if hmac.compare_digest(given, key.encode()):
            match = i
    if match < 0:
        raise ApiError(401, "unauthorized", "unauthorized", headers={"WWW-Authenticate": "Bearer"})
    return hashlib.sha256(keys[match].encode()).hexdigest()[:16]


AuthDep = Annotated[str, Depends(require_auth)]
