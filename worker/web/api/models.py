"""The /v1 API's request and response models and its error answer: the shapes the OpenAPI
document describes, apart from the routes that use them."""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, create_model

from worker.mail.payload import MAX_BATCH, SendPayload
from worker.queue.store.jobrecord import Job


class Problem(BaseModel):
    field: str = Field(description="where in the body, e.g. to[0] or messages[2].subject")
    message: str


class ErrorBody(BaseModel):
    error: str
    problems: list[Problem] = Field(default_factory=list)


class Accepted(BaseModel):
    job_id: str


class BatchAccepted(BaseModel):
    job_ids: list[str]


class BatchIn(BaseModel):
    messages: list[SendPayload] = Field(max_length=MAX_BATCH)


# A job as GET /v1/jobs/{id} shows it: the fields of worker.queue.store.jobrecord.Job that Job.as_dict()
# writes, every one required (as_dict always writes them), typed as in the dataclass except
# where as_dict fills in a value.
_JOB_FIELDS_NOT_SHOWN = frozenset({"enqueued_at", "payload", "submitted_by", "unreadable"})
_JOB_TYPES_IN_AS_DICT: dict[str, Any] = {"history": list[dict[str, Any]]}  # as_dict: [] for none


def _job_model() -> type[BaseModel]:
    """JobOut, from the dataclass rather than a second list of its fields."""
    hints = get_type_hints(Job)
    shown = [field.name for field in dataclasses.fields(Job) if field.name not in _JOB_FIELDS_NOT_SHOWN]
    fields: dict[str, Any] = {name: (_JOB_TYPES_IN_AS_DICT.get(name, hints[name]), ...) for name in shown}
    return create_model("JobOut", **fields)


JobOut = _job_model()


class AccountHealthOut(BaseModel):
    ok: bool | None = None
    result: str | None = None
    checked_at: Any = None
    error: str | None = None


class AccountOut(BaseModel):
    state: str
    reason: str | None = None
    health: AccountHealthOut | None = None
    certificate_days_left: dict[str, int] = Field(default_factory=dict)


class AccountsOut(BaseModel):
    accounts: dict[str, AccountOut]


class HttpError(Exception):
    """An API error: answered as an :class:`ErrorBody` with ``status`` (and ``headers``)."""

    def __init__(
        self,
        status: int,
        error: str,
        problems: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.error = error
        self.problems = problems or []
        self.headers = headers or {}
        super().__init__(error)

    def response(self) -> JSONResponse:
        problems = []
        for text in self.problems:
            field, sep, message = text.partition(": ")
            problems.append({"field": field, "message": message} if sep else {"field": "", "message": text})
        return JSONResponse(
            {"error": self.error, "problems": problems}, status_code=self.status, headers=self.headers
        )


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that can answer each of ``codes`` with an ErrorBody."""
    return {code: {"model": ErrorBody} for code in codes}
