"""What an attempt produced: JobResult (the worker's RESULT.json), JobError, and error codes with their retry rule."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from h2kd.model.spec import explain_validation_error

MAX_ERROR_MESSAGE = 16384


class ErrorCode(str, Enum):
    VALIDATION_FAILED = "VALIDATION_FAILED"
    INVALID_IMAGE = "INVALID_IMAGE"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NO_SPACE = "NO_SPACE"
    OUTPUT_EXISTS = "OUTPUT_EXISTS"
    SOURCE_CHANGED = "SOURCE_CHANGED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOL_FAILED = "TOOL_FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    WORKER_LOST = "WORKER_LOST"
    UNIT_FAILED = "UNIT_FAILED"
    INTERNAL = "INTERNAL"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text: str | None) -> ErrorCode:
        """The code named by text; INTERNAL for anything unknown (e.g. from an external worker)."""
        try:
            return cls(text)
        except ValueError:
            return cls.INTERNAL


# Retrying cannot help: the input or the request itself is wrong.
NON_RETRYABLE: frozenset[ErrorCode] = frozenset({
    ErrorCode.VALIDATION_FAILED, ErrorCode.INVALID_IMAGE, ErrorCode.PERMISSION_DENIED,
    ErrorCode.OUTPUT_EXISTS, ErrorCode.UNSUPPORTED,
})


def is_retryable(code: ErrorCode | str) -> bool:
    return ErrorCode.parse(str(code)) not in NON_RETRYABLE


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobError(_Model):
    phase: str = Field(default="", max_length=64)
    code: ErrorCode
    message: str = Field(default="", max_length=MAX_ERROR_MESSAGE)
    retryable: bool = True

    @model_validator(mode="before")
    @classmethod
    def _retryable_from_code(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("retryable") is None and "code" in data:
            data = {**data, "retryable": is_retryable(data["code"])}
        return data

    @classmethod
    def make(cls, code: ErrorCode, message: str, phase: str = "", retryable: bool | None = None) -> JobError:
        """An error with the message cut to the allowed length (tool output can be long)."""
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[: MAX_ERROR_MESSAGE - 1] + "…"
        return cls(phase=phase[:64], code=code, message=message, retryable=retryable)


class JobMetrics(_Model):
    execution_seconds: float = Field(default=0.0, ge=0)
    bytes_read: int = Field(default=0, ge=0)
    bytes_written: int = Field(default=0, ge=0)


class JobResult(_Model):
    status: Literal["completed", "failed", "cancelled"]
    outputs: dict[str, Any] = Field(default_factory=dict)
    metrics: JobMetrics = Field(default_factory=JobMetrics)
    error: JobError | None = None
    worker: str = ""
    attempt: int = Field(default=0, ge=0)
    # A failed unit's last log lines, which h2kd adds from the journal (the result is for the job's owner and
    # administrators to read; the error's message is everyone's).
    log_tail: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _error_matches_status(self) -> JobResult:
        if self.status == "failed" and self.error is None:
            raise ValueError("a failed result must say what the error was")
        if self.status == "completed" and self.error is not None:
            raise ValueError("a completed result cannot carry an error")
        return self

    @property
    def success(self) -> bool:
        return self.status == "completed"


def parse_result(data: Any) -> JobResult:
    """Validate a result (e.g. a worker's RESULT.json). Raises ValueError with a plain sentence."""
    try:
        return JobResult.model_validate(data)
    except ValidationError as e:
        field, message = explain_validation_error(e, data)
        raise ValueError(f"{field}: {message}" if field else message) from None


def result_to_json(result: JobResult) -> dict[str, Any]:
    return result.model_dump(mode="json")
