"""The OCI Distribution error codes, in one place.

Handlers raise ``RegistryError`` (through the helpers below); one middleware
(``node.app.error_middleware``) renders it as the spec's JSON body
``{"errors": [{"code", "message", "detail"}]}`` with its status.
"""

from __future__ import annotations

import json
from typing import Any

# code -> (HTTP status, default message), from the distribution spec.
CODES: dict[str, tuple[int, str]] = {
    "BLOB_UNKNOWN": (404, "blob unknown to registry"),
    "BLOB_UPLOAD_INVALID": (400, "blob upload invalid"),
    "BLOB_UPLOAD_UNKNOWN": (404, "blob upload unknown to registry"),
    "DIGEST_INVALID": (400, "provided digest did not match uploaded content"),
    "MANIFEST_BLOB_UNKNOWN": (400, "manifest references a manifest or blob unknown to registry"),
    "MANIFEST_INVALID": (400, "manifest invalid"),
    "MANIFEST_UNKNOWN": (404, "manifest unknown to registry"),
    "NAME_INVALID": (400, "invalid repository name"),
    "NAME_UNKNOWN": (404, "repository name not known to registry"),
    "SIZE_INVALID": (400, "provided length did not match content length"),
    "UNAUTHORIZED": (401, "authentication required"),
    "DENIED": (403, "requested access to the resource is denied"),
    "UNSUPPORTED": (405, "the operation is unsupported"),
    "TOOMANYREQUESTS": (429, "too many requests"),
    # Not in the spec's table, used by Distribution and clients understand them.
    "TAG_INVALID": (400, "manifest tag did not match URI"),
    "PAGINATION_NUMBER_INVALID": (400, "invalid number of results requested"),
    "RANGE_INVALID": (416, "invalid content range"),
    "CONFLICT": (409, "the resource was changed concurrently"),
    "UNAVAILABLE": (503, "service unavailable"),
}


class RegistryError(Exception):
    def __init__(
        self,
        code: str,
        message: str | None = None,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        default_status, default_message = CODES[code]
        self.code = code
        self.status = status or default_status
        self.message = message or default_message
        self.detail = detail
        self.headers = headers or {}
        super().__init__(f"{code}: {self.message}")

    def body(self) -> bytes:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return json.dumps({"errors": [err]}).encode()


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError("BLOB_UNKNOWN", detail={"digest": digest})


def manifest_unknown(reference: str) -> RegistryError:
    return RegistryError("MANIFEST_UNKNOWN", detail={"reference": reference})


def name_unknown(name: str) -> RegistryError:
    return RegistryError("NAME_UNKNOWN", detail={"name": name})


def upload_unknown(upload_id: str) -> RegistryError:
    return RegistryError("BLOB_UPLOAD_UNKNOWN", detail={"uuid": upload_id})


def digest_invalid(detail: Any) -> RegistryError:
    return RegistryError("DIGEST_INVALID", detail=detail)


def manifest_invalid(reason: str) -> RegistryError:
    return RegistryError("MANIFEST_INVALID", detail={"reason": reason})


def unavailable(reason: str) -> RegistryError:
    return RegistryError("UNAVAILABLE", reason, headers={"Retry-After": "1"})
