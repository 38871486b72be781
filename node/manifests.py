"""Parsing and checking of pushed manifests (OCI image-spec, Docker schema2).

``parse`` turns the pushed bytes and Content-Type into a ``ManifestRecord``
plus the references that must exist before the push is accepted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from cluster.namespace import MAX_RECORD_ANNOTATIONS, ManifestRecord
from ocidist import mediatypes as mt
from ocidist.digests import parse_digest
from ocidist.errors import Code, RegistryError, manifest_invalid
from ocidist.mediatypes import acceptable  # noqa: F401 - shared with the router

MAX_MANIFEST_SIZE = 4 << 20
MAX_RECORD_SIZE = 1 << 20  # under etcd's 1.5 MiB request limit
MAX_DESCRIPTOR_SIZE = (1 << 63) - 1  # image-spec: an int64


@dataclass(frozen=True, slots=True)
class Parsed:
    record: ManifestRecord
    required_blobs: tuple[str, ...]
    required_manifests: tuple[str, ...]
    # The size each required digest's descriptor declares (checked against
    # what the registry stores under that digest).
    sizes: dict[str, int]


def _descriptor(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise manifest_invalid(f"{where} is not a descriptor object")
    mt = d.get("mediaType")
    digest = d.get("digest")
    size = d.get("size")
    if not isinstance(mt, str) or not mt:
        raise manifest_invalid(f"{where}.mediaType missing")
    if not isinstance(digest, str):
        raise manifest_invalid(f"{where}.digest missing")
    parse_digest(digest, code=Code.MANIFEST_INVALID)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise manifest_invalid(f"{where}.size must be a non-negative integer")
    if size > MAX_DESCRIPTOR_SIZE:
        raise manifest_invalid(f"{where}.size is larger than a blob can be")
    urls = d.get("urls")
    if urls is not None and not (isinstance(urls, list) and all(isinstance(u, str) for u in urls)):
        raise manifest_invalid(f"{where}.urls must be a list of strings")
    return d


def _annotations(doc: dict[str, Any]) -> dict[str, str]:
    ann = doc.get("annotations")
    if ann is None:
        return {}
    if not isinstance(ann, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
    ):
        raise manifest_invalid("annotations must map strings to strings")
    return ann


def parse(body: bytes, content_type: str | None, digest: str) -> Parsed:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise manifest_invalid(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise manifest_invalid("manifest must be a JSON object")
    ct = (content_type or "").split(";")[0].strip()
    body_mt = doc.get("mediaType")
    if body_mt is not None and (not isinstance(body_mt, str) or not body_mt):
        raise manifest_invalid("mediaType must be a non-empty string when present")
    if ct in mt.SCHEMA1 or body_mt in mt.SCHEMA1 or doc.get("schemaVersion") == 1:
        raise RegistryError(
            Code.MANIFEST_INVALID, "Docker schema1 manifests are not supported", status=400
        )
    if ct in mt.MANIFEST_TYPES:
        media_type = ct
        if body_mt and body_mt != ct:
            raise manifest_invalid(f"mediaType {body_mt!r} does not match Content-Type {ct!r}")
    elif body_mt in mt.MANIFEST_TYPES:
        media_type = body_mt
    elif not ct or ct in ("application/json", "application/octet-stream"):
        # No usable type given: OCI allows an unset mediaType, infer it.
        if "manifests" in doc:
            media_type = mt.OCI_INDEX
        elif "config" in doc:
            media_type = mt.OCI_MANIFEST
        else:
            raise manifest_invalid("cannot tell the manifest's media type")
    else:
        raise RegistryError(
            Code.MANIFEST_INVALID,
            f"unsupported manifest media type {ct!r}",
            detail={"mediaType": ct},
        )
    if doc.get("schemaVersion") != 2:
        raise manifest_invalid("schemaVersion must be 2")

    subject = None
    if "subject" in doc:
        subject = _descriptor(doc["subject"], "subject")["digest"]
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise manifest_invalid("artifactType must be a string")
    artifact_type = artifact_type or None  # the spec treats empty as missing
    annotations = _annotations(doc)
    blobs: list[str] = []
    required_blobs: list[str] = []
    children: list[str] = []
    sizes: dict[str, int] = {}

    def require(desc: dict[str, Any], where: str) -> str:
        d, size = desc["digest"], desc["size"]
        if sizes.setdefault(d, size) != size:
            raise manifest_invalid(f"{where} gives {d} another size than an earlier descriptor")
        return d

    if media_type in mt.IMAGE_TYPES:
        if "manifests" in doc:
            raise manifest_invalid("an image manifest has no 'manifests'")
        config = _descriptor(doc.get("config"), "config")
        layers = doc.get("layers", [])
        if not isinstance(layers, list):
            raise manifest_invalid("layers must be a list")
        if media_type == mt.DOCKER_MANIFEST and not layers:
            raise manifest_invalid("a Docker image manifest needs at least one layer")
        blobs.append(config["digest"])
        required_blobs.append(require(config, "config"))
        for i, layer in enumerate(layers):
            layer = _descriptor(layer, f"layers[{i}]")
            blobs.append(layer["digest"])
            lmt = layer["mediaType"]
            if layer.get("urls") and (lmt in mt.NON_DISTRIBUTABLE or "nondistributable" in lmt):
                continue  # fetched from its urls, not from the registry
            required_blobs.append(require(layer, f"layers[{i}]"))
        if artifact_type is None and media_type == mt.OCI_MANIFEST:
            # Referrers report an artifact's type as its config media type.
            artifact_type = config["mediaType"]
    else:
        if "config" in doc or "layers" in doc:
            raise manifest_invalid("an index has no 'config' or 'layers'")
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise manifest_invalid("manifests must be a list")
        for i, m in enumerate(manifests):
            m = _descriptor(m, f"manifests[{i}]")
            children.append(require(m, f"manifests[{i}]"))
        if media_type == mt.OCI_INDEX:
            for i, b in enumerate(doc.get("blobs", []) or []):
                b = _descriptor(b, f"blobs[{i}]")
                blobs.append(b["digest"])
                required_blobs.append(require(b, f"blobs[{i}]"))

    annotations_elided = False
    if annotations and len(json.dumps(annotations)) > MAX_RECORD_ANNOTATIONS:
        annotations, annotations_elided = {}, True
    record = ManifestRecord(
        digest=digest,
        media_type=media_type,
        size=len(body),
        blobs=tuple(dict.fromkeys(blobs)),
        manifests=tuple(dict.fromkeys(children)),
        subject=subject,
        artifact_type=artifact_type,
        annotations=annotations,
        created=time.time(),
        annotations_elided=annotations_elided,
    )
    if len(record.to_json()) > MAX_RECORD_SIZE:
        raise manifest_invalid("the manifest references more items than a registry record holds")
    return Parsed(
        record, tuple(dict.fromkeys(required_blobs)), tuple(dict.fromkeys(children)), sizes
    )


def referrer_descriptor(rec: ManifestRecord, body: bytes | None = None) -> dict[str, Any]:
    """The descriptor of a referrer; ``body`` supplies the annotations of a
    record whose annotations were too large to keep."""
    d: dict[str, Any] = {"mediaType": rec.media_type, "digest": rec.digest, "size": rec.size}
    if rec.artifact_type:
        d["artifactType"] = rec.artifact_type
    annotations = rec.annotations
    if rec.annotations_elided and body is not None:
        annotations = json.loads(body).get("annotations") or {}
    if annotations:
        d["annotations"] = annotations
    return d
