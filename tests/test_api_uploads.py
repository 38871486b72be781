"""Blob uploads: monolithic, POST+PUT, chunked PATCH, streamed PATCH, status,
cancel, digest checks, unknown sessions, cross-repository mounts."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator

import pytest

from tests import oci
from tests.oci import Client, assert_error, blob_path
from tests.procs import NodeProcess

reg_node = oci.module_node_fixture("uploads")
api = oci.client_fixture()

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _session_headers(r: oci.Resp, repo: str) -> str:
    """Check the headers every upload-session response carries; return the id."""
    upload_id = r.headers["Docker-Upload-UUID"]
    loc = r.location
    assert f"/v2/{repo}/blobs/uploads/" in loc, r
    assert upload_id in loc, r
    return upload_id


async def _patch(api: Client, loc: str, data: bytes, start: int) -> oci.Resp:
    return await api.patch(
        loc,
        data=data,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{start}-{start + len(data) - 1}",
        },
    )


async def _status_range(api: Client, loc: str) -> str:
    r = await api.get(loc)
    assert r.status == 204, r
    return r.headers["Range"]


async def test_monolithic_post(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(4096)
    d = oci.digest(data)
    r = await api.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, data=data)
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == d
    assert r.location.endswith(blob_path(repo, d)) or r.location.endswith(
        blob_path(repo, d.replace(":", "%3A"))
    ), r
    g = await api.get(r.location)
    assert g.status == 200 and g.body == data, g


async def test_monolithic_post_streamed(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(200_000)
    d = oci.digest(data)
    r = await api.post(
        f"/v2/{repo}/blobs/uploads/", params={"digest": d}, data=oci.chunks(data, 7000)
    )
    assert r.status == 201, r
    g = await api.get(blob_path(repo, d))
    assert g.body == data


async def test_monolithic_post_wrong_digest(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes()
    wrong = oci.unknown_digest()
    r = await api.post(f"/v2/{repo}/blobs/uploads/", params={"digest": wrong}, data=data)
    assert_error(r, 400, "DIGEST_INVALID")
    assert_error(await api.head(blob_path(repo, wrong)), 404)
    assert_error(await api.head(blob_path(repo, oci.digest(data))), 404)


async def test_monolithic_post_malformed_digest(api: Client) -> None:
    repo = oci.repo_name()
    r = await api.post(f"/v2/{repo}/blobs/uploads/", params={"digest": "sha256:xyz"}, data=b"a")
    assert_error(r, 400, "DIGEST_INVALID")


async def test_post_then_put_with_body(api: Client) -> None:
    repo = oci.repo_name()
    r = await api.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status == 202, r
    upload_id = _session_headers(r, repo)
    assert UUID_RE.match(upload_id), r
    assert r.headers["Range"] == "0-0", r

    data = oci.blob_bytes(10_000)
    d = oci.digest(data)
    r = await api.put(
        r.location,
        params={"digest": d},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == d
    g = await api.get(r.location)
    assert g.status == 200 and g.body == data, g
    # The session is finished: its URL is gone.
    assert_error(await api.get(f"/v2/{repo}/blobs/uploads/{upload_id}"), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_upload_ids_are_unique(api: Client) -> None:
    repo = oci.repo_name()
    ids = {(await api.start_upload(repo)).headers["Docker-Upload-UUID"] for _ in range(5)}
    assert len(ids) == 5


async def test_chunked_patch_in_order(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(30_000)
    loc = (await api.start_upload(repo)).location
    offset = 0
    for size in (10_000, 1, 12_345, 7_654):
        r = await _patch(api, loc, data[offset : offset + size], offset)
        assert r.status == 202, r
        offset += size
        assert r.headers["Range"] == f"0-{offset - 1}", r
        _session_headers(r, repo)
        loc = r.location
        assert await _status_range(api, loc) == f"0-{offset - 1}"
    assert offset == len(data)
    d = oci.digest(data)
    r = await api.put(loc, params={"digest": d})
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == d
    g = await api.get(blob_path(repo, d))
    assert g.body == data


async def test_chunked_patch_without_content_range(api: Client) -> None:
    """Chunks without Content-Range are appended in order (streamed style)."""
    repo = oci.repo_name()
    data = oci.blob_bytes(3000)
    loc = (await api.start_upload(repo)).location
    for i in range(0, 3000, 1000):
        r = await api.patch(loc, data=data[i : i + 1000])
        assert r.status == 202, r
        loc = r.location
    assert r.headers["Range"] == "0-2999"
    r = await api.put(loc, params={"digest": oci.digest(data)})
    assert r.status == 201, r


async def test_final_chunk_in_put(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(2000)
    loc = (await api.start_upload(repo)).location
    r = await _patch(api, loc, data[:1500], 0)
    assert r.status == 202, r
    d = oci.digest(data)
    r = await api.put(
        r.location,
        params={"digest": d},
        data=data[1500:],
        headers={"Content-Type": "application/octet-stream", "Content-Range": "1500-1999"},
    )
    assert r.status == 201, r
    assert (await api.get(blob_path(repo, d))).body == data


@pytest.mark.parametrize(
    "bad_range",
    [
        "20-29",  # a gap after the current offset
        "5-14",  # overlaps bytes already received
        "0-9",  # the first chunk again
        "9-18",  # overlaps by one byte
        "11-20",  # one past the offset
    ],
)
async def test_out_of_order_chunk_is_rejected_and_changes_nothing(
    api: Client, bad_range: str
) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(30)
    loc = (await api.start_upload(repo)).location
    r = await _patch(api, loc, data[:10], 0)
    assert r.status == 202, r
    loc = r.location

    start, end = (int(x) for x in bad_range.split("-"))
    r = await api.patch(
        loc,
        data=oci.blob_bytes(end - start + 1),
        headers={"Content-Type": "application/octet-stream", "Content-Range": bad_range},
    )
    assert_error(r, 416, "RANGE_INVALID", "BLOB_UPLOAD_INVALID")
    assert await _status_range(api, loc) == "0-9"

    # The session continues from the old offset and the digest verifies.
    r = await _patch(api, loc, data[10:], 10)
    assert r.status == 202, r
    r = await api.put(r.location, params={"digest": oci.digest(data)})
    assert r.status == 201, r


async def test_out_of_order_first_chunk(api: Client) -> None:
    repo = oci.repo_name()
    loc = (await api.start_upload(repo)).location
    r = await api.patch(
        loc,
        data=b"0123456789",
        headers={"Content-Type": "application/octet-stream", "Content-Range": "10-19"},
    )
    assert_error(r, 416, "RANGE_INVALID", "BLOB_UPLOAD_INVALID")
    assert await _status_range(api, loc) == "0-0"


@pytest.mark.parametrize("bad_range", ["10-5", "abc", "bytes=x-y", "-5"])
async def test_malformed_content_range(api: Client, bad_range: str) -> None:
    repo = oci.repo_name()
    loc = (await api.start_upload(repo)).location
    r = await _patch(api, loc, b"0123456789", 0)
    loc = r.location
    r = await api.patch(
        loc,
        data=b"abcdef",
        headers={"Content-Type": "application/octet-stream", "Content-Range": bad_range},
    )
    assert r.status in (400, 416), r
    assert_error(r, r.status, "RANGE_INVALID", "BLOB_UPLOAD_INVALID")
    assert await _status_range(api, loc) == "0-9"


async def test_content_length_disagrees_with_content_range(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(20)
    loc = (await api.start_upload(repo)).location
    r = await _patch(api, loc, data[:10], 0)
    loc = r.location
    # Content-Range announces 20 bytes, the body (Content-Length) has 10.
    r = await api.patch(
        loc,
        data=data[10:],
        headers={"Content-Type": "application/octet-stream", "Content-Range": "10-29"},
    )
    assert r.status in (400, 416), r
    assert_error(r, r.status, "RANGE_INVALID", "SIZE_INVALID", "BLOB_UPLOAD_INVALID")
    assert await _status_range(api, loc) == "0-9"
    r = await _patch(api, loc, data[10:], 10)
    assert r.status == 202, r
    assert (await api.put(r.location, params={"digest": oci.digest(data)})).status == 201


async def test_truncated_body_is_not_a_blob(api: Client, reg_node) -> None:
    """A monolithic upload whose body ends before its Content-Length never
    becomes a blob (the server may answer or just close)."""
    repo = oci.repo_name()
    data = oci.blob_bytes(1000)
    d = oci.digest(data)
    path = f"/v2/{repo}/blobs/uploads/?digest={d}"
    (auth,) = (await api.auth_headers("POST", path)).values()
    req = (
        f"POST {path} HTTP/1.1\r\nAuthorization: {auth}\r\n"
        f"Host: {reg_node.hostport}\r\nContent-Length: {len(data)}\r\n"
        "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    ).encode() + data[:400]
    answer = await oci.raw_exchange(reg_node.hostport, req)
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert status not in (201, 401) and status < 500, answer
    assert_error(await api.head(blob_path(repo, d)), 404)


async def test_expect_100_continue_is_answered_before_the_body(api: Client, reg_node) -> None:
    """A client that sends ``Expect: 100-continue`` (curl does for large
    bodies) waits for ``100 Continue`` before its body; then the upload
    completes as any other."""
    repo = oci.repo_name()
    data = oci.blob_bytes(5000)
    d = oci.digest(data)
    path = f"/v2/{repo}/blobs/uploads/?digest={d}"
    (auth,) = (await api.auth_headers("POST", path)).values()
    host, _, port = reg_node.hostport.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {reg_node.hostport}\r\nAuthorization: {auth}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n"
                "Expect: 100-continue\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 201"), answer
    r = await api.get(blob_path(repo, d))
    assert r.status == 200 and r.body == data, r


async def _dropped_patch(api: Client, hostport: str, repo: str, data: bytes) -> str:
    """An upload with 1000 bytes, then a PATCH for the rest whose connection
    drops after 700 more bytes; returns the session URL."""
    loc = (await api.start_upload(repo)).location
    r = await _patch(api, loc, data[:1000], 0)
    assert r.status == 202, r
    loc = r.location
    path = loc if loc.startswith("/") else "/" + loc.split("://", 1)[1].split("/", 1)[1]
    (auth,) = (await api.auth_headers("PATCH", path)).values()
    req = (
        f"PATCH {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: {auth}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Range: 1000-{len(data) - 1}\r\n"
        f"Content-Length: {len(data) - 1000}\r\nConnection: close\r\n\r\n"
    ).encode() + data[1000:1700]
    answer = await oci.raw_exchange(hostport, req)
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert status != 401 and status < 500, answer
    return loc


def _offset(range_header: str) -> int:
    m = re.fullmatch(r"0-(\d+)", range_header)
    assert m, range_header
    return int(m.group(1)) + 1


async def test_truncated_patch_can_be_resumed(api: Client, reg_node) -> None:
    """After a PATCH whose body is cut short, a client following the spec
    (GET the status, PATCH from its offset, on 416 GET again) completes the
    blob; the offset lies between what was acknowledged and what was sent."""
    repo = oci.repo_name()
    data = oci.blob_bytes(3000)
    loc = await _dropped_patch(api, reg_node.hostport, repo, data)
    for _ in range(100):
        offset = _offset(await _status_range(api, loc))
        assert 1000 <= offset <= 1700, offset
        r = await _patch(api, loc, data[offset:], offset)
        if r.status != 416:
            break
        await asyncio.sleep(0.02)  # the server may still be finishing the dropped request
    assert r.status == 202, r
    r = await api.put(r.location, params={"digest": oci.digest(data)})
    assert r.status == 201, r
    assert (await api.get(blob_path(repo, oci.digest(data)))).body == data


async def test_status_after_dropped_patch_is_settled(api: Client, reg_node) -> None:
    """The status of a session whose PATCH connection just dropped reports
    the final offset (it waits for the in-flight PATCH), so resuming from it
    is accepted the first time. Several rounds, as the race is not certain."""
    for _ in range(10):
        repo = oci.repo_name()
        data = oci.blob_bytes(3000)
        loc = await _dropped_patch(api, reg_node.hostport, repo, data)
        offset = _offset(await _status_range(api, loc))
        r = await _patch(api, loc, data[offset:], offset)
        assert r.status == 202, (offset, r)
        assert (await api.put(r.location, params={"digest": oci.digest(data)})).status == 201


async def test_streamed_patch_chunked_transfer_encoding(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(300_000)
    loc = (await api.start_upload(repo)).location
    r = await api.patch(
        loc,
        data=oci.chunks(data, 16_384),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status == 202, r
    assert r.headers["Range"] == f"0-{len(data) - 1}", r
    # a second streamed chunk, then an empty-bodied PUT
    more = oci.blob_bytes(5000)
    r = await api.patch(r.location, data=oci.chunks(more, 999))
    assert r.status == 202, r
    assert r.headers["Range"] == f"0-{len(data) + len(more) - 1}", r
    d = oci.digest(data + more)
    r = await api.put(r.location, params={"digest": d})
    assert r.status == 201, r
    g = await api.get(blob_path(repo, d))
    assert g.body == data + more


async def test_streamed_put_chunked_transfer_encoding(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(70_000)
    loc = (await api.start_upload(repo)).location
    d = oci.digest(data, "sha512")
    r = await api.put(loc, params={"digest": d}, data=oci.chunks(data, 4096))
    assert r.status == 201, r
    assert (await api.get(blob_path(repo, d))).body == data


async def test_upload_status(api: Client) -> None:
    repo = oci.repo_name()
    start = await api.start_upload(repo)
    upload_id = _session_headers(start, repo)
    r = await api.get(start.location)
    assert r.status == 204, r
    assert r.body == b""
    assert r.headers["Range"] == "0-0"
    assert r.headers["Docker-Upload-UUID"] == upload_id
    assert upload_id in r.location
    await _patch(api, start.location, b"x" * 77, 0)
    r = await api.get(start.location)
    assert r.status == 204, r
    assert r.headers["Range"] == "0-76"
    assert r.headers["Docker-Upload-UUID"] == upload_id
    _session_headers(r, repo)


async def test_cancel_upload(api: Client) -> None:
    repo = oci.repo_name()
    data = b"partial data"
    loc = (await api.start_upload(repo)).location
    await _patch(api, loc, data, 0)
    r = await api.delete(loc)
    assert r.status == 204, r
    assert_error(await api.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(await _patch(api, loc, b"more", len(data)), 404, "BLOB_UPLOAD_UNKNOWN")
    r = await api.put(loc, params={"digest": oci.digest(data)})
    assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(await api.delete(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(await api.head(blob_path(repo, oci.digest(data))), 404)


async def test_put_wrong_digest(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(500)
    loc = (await api.start_upload(repo)).location
    r = await _patch(api, loc, data, 0)
    wrong = oci.digest(data + b"!")
    r = await api.put(r.location, params={"digest": wrong})
    assert_error(r, 400, "DIGEST_INVALID")
    assert_error(await api.head(blob_path(repo, wrong)), 404)
    assert_error(await api.head(blob_path(repo, oci.digest(data))), 404)
    assert_error(await api.get(blob_path(repo, wrong)), 404, "BLOB_UNKNOWN")


async def test_put_wrong_digest_with_body(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(500)
    loc = (await api.start_upload(repo)).location
    wrong = oci.unknown_digest("sha512")
    r = await api.put(loc, params={"digest": wrong}, data=data)
    assert_error(r, 400, "DIGEST_INVALID")
    assert_error(await api.head(blob_path(repo, wrong)), 404)
    assert_error(await api.head(blob_path(repo, oci.digest(data))), 404)


@pytest.mark.parametrize("params", [None, {"digest": ""}])
async def test_put_without_digest(api: Client, params: dict | None) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(100)
    loc = (await api.start_upload(repo)).location
    r = await api.put(loc, params=params, data=data)
    assert_error(r, 400, "DIGEST_INVALID", "BLOB_UPLOAD_INVALID")
    assert_error(await api.head(blob_path(repo, oci.digest(data))), 404)


async def test_put_malformed_digest(api: Client) -> None:
    repo = oci.repo_name()
    loc = (await api.start_upload(repo)).location
    r = await api.put(loc, params={"digest": "sha256:../../etc/passwd"}, data=b"abc")
    assert_error(r, 400, "DIGEST_INVALID")


@pytest.mark.parametrize("method", ["GET", "PATCH", "PUT", "DELETE"])
async def test_unknown_upload_id(api: Client, method: str) -> None:
    repo = oci.repo_name()
    await api.start_upload(repo)
    path = f"/v2/{repo}/blobs/uploads/{uuid.uuid4()}"
    params = {"digest": oci.digest(b"x")} if method == "PUT" else None
    r = await api.req(method, path, data=b"x" if method != "GET" else None, params=params)
    assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")


@pytest.mark.parametrize(
    "upload_id",
    ["..", "%2e%2e", "../../etc", "..%2F..%2Fetc", "not-a-uuid", "info.json", "%00", "."],
)
@pytest.mark.parametrize("method", ["GET", "PATCH", "PUT", "DELETE"])
async def test_non_uuid_upload_id(api: Client, method: str, upload_id: str) -> None:
    repo = oci.repo_name()
    await api.start_upload(repo)
    path = f"/v2/{repo}/blobs/uploads/{upload_id}"
    params = {"digest": oci.digest(b"x")} if method == "PUT" else None
    r = await api.req(method, path, data=b"x" if method != "GET" else None, params=params)
    assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")


@pytest.mark.parametrize("method", ["GET", "PATCH", "PUT", "DELETE"])
async def test_upload_id_on_another_repository(api: Client, method: str) -> None:
    repo, other = oci.repo_name(), oci.repo_name()
    data = oci.blob_bytes(100)
    start = await api.start_upload(repo)
    upload_id = start.headers["Docker-Upload-UUID"]
    r = await _patch(api, start.location, data[:50], 0)
    assert r.status == 202, r
    await api.start_upload(other)

    path = f"/v2/{other}/blobs/uploads/{upload_id}"
    params = {"digest": oci.digest(data)} if method == "PUT" else None
    r = await api.req(method, path, data=data[50:] if method != "GET" else None, params=params)
    assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(await api.head(blob_path(other, oci.digest(data))), 404)

    # The session in its own repository is intact.
    assert await _status_range(api, start.location) == "0-49"
    r = await _patch(api, start.location, data[50:], 50)
    assert r.status == 202, r
    r = await api.put(r.location, params={"digest": oci.digest(data)})
    assert r.status == 201, r


async def test_upload_unsupported_method_on_collection(api: Client) -> None:
    repo = oci.repo_name()
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        r = await api.req(method, f"/v2/{repo}/blobs/uploads/")
        assert_error(r, 405, "UNSUPPORTED")


# -- cross-repository mount ---------------------------------------------------


async def test_mount_from_source(api: Client) -> None:
    src, dst = oci.repo_name(), oci.repo_name()
    data = oci.blob_bytes(2048)
    d = await api.push_blob(src, data)
    r = await api.post(f"/v2/{dst}/blobs/uploads/", params={"mount": d, "from": src})
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == d
    assert f"/v2/{dst}/blobs/" in r.location, r
    g = await api.get(r.location)
    assert g.status == 200 and g.body == data, g
    h = await api.head(blob_path(dst, d))
    assert h.status == 200 and int(h.headers["Content-Length"]) == len(data), h


async def test_mount_sha512(api: Client) -> None:
    src, dst = oci.repo_name(), oci.repo_name()
    data = oci.blob_bytes(100)
    d = await api.push_blob(src, data, alg="sha512")
    r = await api.post(f"/v2/{dst}/blobs/uploads/", params={"mount": d, "from": src})
    assert r.status == 201, r
    assert (await api.get(blob_path(dst, d))).body == data


async def test_mount_blob_source_lacks_starts_upload(api: Client) -> None:
    src, dst, elsewhere = oci.repo_name(), oci.repo_name(), oci.repo_name()
    await api.push_blob(src, oci.blob_bytes())
    data = oci.blob_bytes(300)
    d = await api.push_blob(elsewhere, data)
    for mount in (d, oci.unknown_digest()):
        r = await api.post(f"/v2/{dst}/blobs/uploads/", params={"mount": mount, "from": src})
        assert r.status == 202, r
        _session_headers(r, dst)
        assert_error(await api.head(blob_path(dst, mount)), 404)
    # The session it opened is a normal upload.
    r = await api.put(r.location, params={"digest": d}, data=data)
    assert r.status == 201, r


async def test_mount_from_unknown_repository_starts_upload(api: Client) -> None:
    dst = oci.repo_name()
    d = await api.push_blob(oci.repo_name(), oci.blob_bytes())
    r = await api.post(f"/v2/{dst}/blobs/uploads/", params={"mount": d, "from": oci.repo_name()})
    assert r.status == 202, r
    assert_error(await api.head(blob_path(dst, d)), 404)


async def test_mount_without_from(api: Client) -> None:
    src, dst = oci.repo_name(), oci.repo_name()
    data = oci.blob_bytes(640)
    d = await api.push_blob(src, data)
    r = await api.post(f"/v2/{dst}/blobs/uploads/", params={"mount": d})
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == d
    assert (await api.get(blob_path(dst, d))).body == data


async def test_mount_without_from_unknown_blob(api: Client) -> None:
    dst = oci.repo_name()
    d = oci.unknown_digest()
    r = await api.post(f"/v2/{dst}/blobs/uploads/", params={"mount": d})
    assert r.status == 202, r
    _session_headers(r, dst)
    assert_error(await api.head(blob_path(dst, d)), 404)


async def test_mount_of_deleted_blob_starts_upload(api: Client) -> None:
    src, dst = oci.repo_name(), oci.repo_name()
    d = await api.push_blob(src, oci.blob_bytes())
    assert (await api.delete(blob_path(src, d))).status == 202
    r = await api.post(f"/v2/{dst}/blobs/uploads/", params={"mount": d, "from": src})
    assert r.status == 202, r
    assert_error(await api.head(blob_path(dst, d)), 404)


async def test_mount_malformed_from_is_not_an_error_500(api: Client) -> None:
    dst = oci.repo_name()
    d = await api.push_blob(oci.repo_name(), oci.blob_bytes())
    r = await api.post(f"/v2/{dst}/blobs/uploads/", params={"mount": d, "from": "../../x"})
    assert r.status in (202, 400), r
    if r.status == 400:
        assert_error(r, 400, "NAME_INVALID")
    assert_error(await api.head(blob_path(dst, d)), 404)


async def test_digest_algorithm_parameter(api: Client) -> None:
    """POST ?digest-algorithm=sha512 (distribution-spec, end-4c) then chunks
    and a sha512 digest on the closing PUT."""
    repo = oci.repo_name()
    data = oci.blob_bytes(5000)
    r = await api.post(f"/v2/{repo}/blobs/uploads/", params={"digest-algorithm": "sha512"})
    assert r.status == 202, r
    r = await _patch(api, r.location, data, 0)
    assert r.status == 202, r
    d = oci.digest(data, "sha512")
    r = await api.put(r.location, params={"digest": d})
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == d
    assert (await api.get(blob_path(repo, d))).body == data


async def test_concurrent_chunks_at_one_offset(api: Client) -> None:
    """Several clients sending the chunk for the same offset at once: exactly
    one is appended, the others get 416, and the session stays consistent."""
    repo = oci.repo_name()
    data = oci.blob_bytes(20_000)
    loc = (await api.start_upload(repo)).location
    results = await asyncio.gather(*(_patch(api, loc, data[:10_000], 0) for _ in range(4)))
    assert sorted(r.status for r in results) == [202, 416, 416, 416], results
    assert await _status_range(api, loc) == "0-9999"
    r = await _patch(api, loc, data[10_000:], 10_000)
    assert r.status == 202, r
    r = await api.put(r.location, params={"digest": oci.digest(data)})
    assert r.status == 201, r


@pytest.mark.parametrize("cancel_after", [1, 5 << 20])
async def test_delete_while_a_patch_streams(api: Client, cancel_after: int) -> None:
    """DELETE of the session while a PATCH is still streaming into it: the
    DELETE wins (204), the PATCH ends with 404 BLOB_UPLOAD_UNKNOWN (never a
    500), and the session stays gone."""
    repo = oci.repo_name()
    loc = (await api.start_upload(repo)).location
    sent = asyncio.Event()
    deleted = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield os.urandom(cancel_after)  # 5 MiB: more than one write batch
        sent.set()
        await deleted.wait()
        for _ in range(3):
            yield os.urandom(1 << 20)

    patch = asyncio.create_task(
        api.patch(loc, data=body(), headers={"Content-Type": "application/octet-stream"})
    )
    await sent.wait()
    await asyncio.sleep(0.2)  # let the PATCH take the session (ordering, not a threshold)
    r = await api.delete(loc)
    assert r.status == 204, r
    deleted.set()
    assert_error(await patch, 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(await api.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(await api.patch(loc, data=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("0-9/5", None),  # the chunk runs past the total it declares
        ("0-9/10", "10-19/20"),  # the total changed between chunks
        ("0-9/100", "10-19/50"),
    ],
)
async def test_content_range_total_is_checked(api: Client, first: str, second: str | None) -> None:
    """``Content-Range: <start>-<end>/<total>``: a total that contradicts
    the chunk, or an earlier chunk's total, is 416 RANGE_INVALID; ``*``
    or no total is not checked."""
    repo = oci.repo_name()
    loc = (await api.start_upload(repo)).location
    ct = {"Content-Type": "application/octet-stream"}
    r = await api.patch(loc, data=b"x" * 10, headers={**ct, "Content-Range": first})
    if second is None:
        assert_error(r, 416, "RANGE_INVALID")
        assert (await api.get(loc)).headers["Range"] == "0-0"  # nothing appended
        return
    assert r.status == 202, r
    r = await api.patch(r.location, data=b"y" * 10, headers={**ct, "Content-Range": second})
    assert_error(r, 416, "RANGE_INVALID")
    assert (await api.get(loc)).headers["Range"] == "0-9"


async def test_content_range_total_consistent_or_unknown(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(30)
    loc = (await api.start_upload(repo)).location
    ct = {"Content-Type": "application/octet-stream"}
    for rng, part in (("0-9/30", data[:10]), ("10-19/*", data[10:20]), ("20-29/30", data[20:])):
        r = await api.patch(loc, data=part, headers={**ct, "Content-Range": rng})
        assert r.status == 202, r
        loc = r.location
    assert (await api.put(loc, params={"digest": oci.digest(data)})).status == 201


async def _post(api: Client, repo: str, **kw: object) -> oci.Resp:
    return await api.post(f"/v2/{repo}/blobs/uploads/", **kw)


async def test_upload_sessions_are_capped_per_repository_and_in_total(tmp_path) -> None:
    """Sessions open at once are capped per repository and per node; over a
    cap, 429 TOOMANYREQUESTS with Retry-After. Ending a session (DELETE or
    the final PUT) frees its place; sessions surviving a restart still count."""
    extra = ["--max-uploads-per-repo", "3", "--max-uploads", "5"]
    node = NodeProcess(tmp_path / "data", extra=extra).start()
    try:
        async with Client.connect(node.url) as api:
            a, b = oci.repo_name(), oci.repo_name()
            locs = [(await api.start_upload(a)).location for _ in range(3)]
            for kw in ({}, {"params": {"digest": oci.digest(b"x")}, "data": b"x"}):
                r = await _post(api, a, **kw)
                assert_error(r, 429, "TOOMANYREQUESTS")
                assert int(r.headers["Retry-After"]) > 0, r
            for _ in range(2):
                await api.start_upload(b)
            assert_error(await _post(api, b), 429, "TOOMANYREQUESTS")  # 5 on the node
            assert (await api.delete(locs[0])).status == 204
            await api.start_upload(b)
            assert_error(await _post(api, a), 429, "TOOMANYREQUESTS")
            data = oci.blob_bytes(100)
            r = await api.put(locs[1], params={"digest": oci.digest(data)}, data=data)
            assert r.status == 201, r
            await api.start_upload(a)
        node.restart()
        async with Client.connect(node.url) as api:
            assert_error(await _post(api, a), 429, "TOOMANYREQUESTS")
            assert_error(await _post(api, oci.repo_name()), 429, "TOOMANYREQUESTS")
            assert (await api.delete(locs[2])).status == 204
            await api.start_upload(oci.repo_name())
    finally:
        node.stop()


async def test_sessions_that_never_received_data_expire_sooner(tmp_path) -> None:
    node = NodeProcess(tmp_path / "data", extra=["--upload-empty-ttl", "1"]).start()
    try:
        async with Client.connect(node.url) as api:
            repo = oci.repo_name()
            empty = (await api.start_upload(repo)).location
            used = (await api.start_upload(repo)).location
            r = await _patch(api, used, b"0123456789", 0)
            assert r.status == 202, r
            deadline = asyncio.get_running_loop().time() + 30  # a safety net only
            while (await api.get(empty)).status != 404:
                assert asyncio.get_running_loop().time() < deadline, "empty session never purged"
                await asyncio.sleep(0.2)
            r = await api.get(used)
            assert r.status == 204 and r.headers["Range"] == "0-9", r
    finally:
        node.stop()
