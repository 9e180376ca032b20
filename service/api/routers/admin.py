"""What an operator asks the API about the queue's own health: jobs a failover lost."""

from __future__ import annotations

from pydantic import BaseModel

from fastapi import APIRouter

from service.api.deps import AuthDep, ServicesDep
from service.api.schemas import ErrorBody

router = APIRouter(tags=["system"])


class LostJobOut(BaseModel):
    id: str
    model: str
    acknowledged_at: float


class LostJobs(BaseModel):
    lost: list[LostJobOut]
    checked: int
    pending: int


@router.get("/admin/lost-jobs", response_model=LostJobs, responses={401: {"model": ErrorBody}},
            summary="Jobs this API process confirmed that Redis no longer holds (lost in a failover)")
async def lost_jobs(services: ServicesDep, _: AuthDep) -> LostJobs:
    j = services.journal
    return LostJobs(lost=[LostJobOut(id=x.id, model=x.model, acknowledged_at=x.acknowledged_at) for x in j.lost],
                    checked=j.checked, pending=j.pending)
