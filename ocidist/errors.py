"""The OCI Distribution error codes and the spec's error body.

Handlers raise ``RegistryError`` with a ``Code``; one middleware in the node
and one helper in the router render it as
``{"errors": [{"code", "message", "detail"}]}`` with its status.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any


class Code(StrEnum):
    """Error codes. The spec's table first, then the ones Distribution uses
    and clients understand."""

    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_BLOB_UNKNOWN = "MANIFEST_BLOB_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    SIZE_INVALID = "SIZE_INVALID"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    TAG_INVALID = "TAG_INVALID"
    PAGINATION_NUMBER_INVALID = "PAGINATION_NUMBER_INVALID"
    RANGE_INVALID = "RANGE_INVALID"
    CONFLICT = "CONFLICT"
    UNAVAILABLE = "UNAVAILABLE"
    STORAGE_FULL = "STORAGE_FULL"


# code -> (HTTP status, default message)
DEFAULTS: dict[Code, tuple[int, str]] = {
    Code.BLOB_UNKNOWN: (404, "blob unknown to registry"),
    Code.BLOB_UPLOAD_INVALID: (400, "blob upload invalid"),
    Code.BLOB_UPLOAD_UNKNOWN: (404, "blob upload unknown to registry"),
    Code.DIGEST_INVALID: (400, "provided digest did not match uploaded content"),
    Code.MANIFEST_BLOB_UNKNOWN: (
        400,
        "manifest references a manifest or blob unknown to registry",
    ),
    Code.MANIFEST_INVALID: (400, "manifest invalid"),
    Code.MANIFEST_UNKNOWN: (404, "manifest unknown to registry"),
    Code.NAME_INVALID: (400, "invalid repository name"),
    Code.NAME_UNKNOWN: (404, "repository name not known to registry"),
    Code.SIZE_INVALID: (400, "provided length did not match content length"),
    Code.UNAUTHORIZED: (401, "authentication required"),
    Code.DENIED: (403, "requested access to the resource is denied"),
    Code.UNSUPPORTED: (405, "the operation is unsupported"),
    Code.TOOMANYREQUESTS: (429, "too many requests"),
    Code.TAG_INVALID: (400, "manifest tag did not match URI"),
    Code.PAGINATION_NUMBER_INVALID: (400, "invalid number of results requested"),
    Code.RANGE_INVALID: (416, "invalid content range"),
    Code.CONFLICT: (409, "the resource was changed concurrently"),
    Code.UNAVAILABLE: (503, "service unavailable"),
    Code.STORAGE_FULL: (507, "the registry's storage is full"),
}


def error_body(code: Code, message: str, detail: Any = None) -> bytes:
    err: dict[str, Any] = {"code": str(code), "message": message}
    if detail is not None:
        err["detail"] = detail
    return json.dumps({"errors": [err]}).encode()


class RegistryError(Exception):
    def __init__(
        self,
        code: Code,
        message: str | None = None,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        code = code if type(code) is Code else Code(code)  # the enum's call is slow
        default_status, default_message = DEFAULTS[code]
        self.code = code
        self.status = status or default_status
        self.message = message or default_message
        self.detail = detail
        self.headers = headers or {}
        super().__init__(f"{code}: {self.message}")

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(Code.BLOB_UNKNOWN, detail={"digest": digest})


def manifest_unknown(reference: str) -> RegistryError:
    return RegistryError(Code.MANIFEST_UNKNOWN, detail={"reference": reference})


def name_unknown(name: str) -> RegistryError:
    return RegistryError(Code.NAME_UNKNOWN, detail={"name": name})


def upload_unknown(upload_id: str) -> RegistryError:
    return RegistryError(Code.BLOB_UPLOAD_UNKNOWN, detail={"uuid": upload_id})


def digest_invalid(detail: Any) -> RegistryError:
    return RegistryError(Code.DIGEST_INVALID, detail=detail)


def manifest_invalid(reason: str) -> RegistryError:
    return RegistryError(Code.MANIFEST_INVALID, detail={"reason": reason})


def unsupported(method: str | None = None) -> RegistryError:
    detail = {"method": method} if method else None
    return RegistryError(Code.UNSUPPORTED, detail=detail, status=405)


def unavailable(reason: str) -> RegistryError:
    return RegistryError(Code.UNAVAILABLE, reason, headers={"Retry-After": "1"})
