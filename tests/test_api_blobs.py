"""Blobs: HEAD, GET (with Range), DELETE, digests (sha256, sha512, malformed)."""

from __future__ import annotations

import pytest

from tests import oci
from tests.oci import Client, assert_error, blob_path

reg_node = oci.module_node_fixture("blobs")
api = oci.client_fixture()

MALFORMED_DIGESTS = [
    "sha256:abc",  # too short
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "sha256:" + "A" * 64,  # upper-case hex
    "sha256:" + "g" * 64,  # not hex
    "sha256:",
    "sha256",
    "nodigest",
    "md5:d41d8cd98f00b204e9800998ecf8427e",  # unsupported algorithm
    "sha512:" + "0" * 64,  # sha512 with a sha256-length encoding
    "SHA256:" + "0" * 64,
    ":" + "0" * 64,
]


def _check_blob_headers(r: oci.Resp, d: str, size: int) -> None:
    assert r.headers["Docker-Content-Digest"] == d, r
    assert int(r.headers["Content-Length"]) == size, r
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0", r


async def test_head_and_get_blob(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(3000)
    d = await api.push_blob(repo, data)

    r = await api.head(blob_path(repo, d))
    assert r.status == 200, r
    _check_blob_headers(r, d, len(data))
    assert r.body == b""

    r = await api.get(blob_path(repo, d))
    assert r.status == 200, r
    _check_blob_headers(r, d, len(data))
    assert r.body == data
    assert oci.digest(r.body) == d


async def test_blob_is_scoped_to_its_repository(api: Client) -> None:
    repo, other = oci.repo_name(), oci.repo_name()
    d = await api.push_blob(repo, oci.blob_bytes())
    await api.push_blob(other, oci.blob_bytes())  # the other repo exists
    assert_error(await api.get(blob_path(other, d)), 404, "BLOB_UNKNOWN")
    assert_error(await api.head(blob_path(other, d)), 404)


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=10-19", 10, 19),
        ("bytes=100-", 100, 999),
        ("bytes=-24", 976, 999),
        ("bytes=990-5000", 990, 999),  # end past the size is clipped
        ("bytes=999-999", 999, 999),
    ],
)
async def test_range_get(api: Client, range_header: str, start: int, end: int) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(1000)
    d = await api.push_blob(repo, data)
    r = await api.get(blob_path(repo, d), headers={"Range": range_header})
    assert r.status == 206, r
    assert r.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}", r
    assert int(r.headers["Content-Length"]) == end - start + 1
    assert r.body == data[start : end + 1]
    assert r.headers["Docker-Content-Digest"] == d


@pytest.mark.parametrize(
    "range_header", ["bytes=1000-", "bytes=5000-6000", "bytes=1000-1000", "bytes=-0", "BYTES=-0"]
)
async def test_range_unsatisfiable(api: Client, range_header: str) -> None:
    """RFC 9110 14.1.1: a first-pos at or past the size, or a suffix of zero
    bytes, is not satisfiable: 416 with ``bytes */size`` and the OCI error."""
    repo = oci.repo_name()
    data = oci.blob_bytes(1000)
    d = await api.push_blob(repo, data)
    r = await api.get(blob_path(repo, d), headers={"Range": range_header})
    assert_error(r, 416, "RANGE_INVALID")
    assert r.headers.get("Content-Range") == "bytes */1000", r
    assert data not in r.body
    r = await api.head(blob_path(repo, d), headers={"Range": range_header})
    assert r.status == 416 and r.headers.get("Content-Range") == "bytes */1000", r


@pytest.mark.parametrize(
    "range_header",
    [
        "bytes=5-2",  # last-pos before first-pos: invalid, ignored
        "bytes=0-1,5-6",  # several ranges: ignored (no multipart answers)
        "bytes=x-5",
        "bytes=\u0661-2",  # non-ASCII digits are not digits
        "bytes 0-5",
        "bytes=",
        "bytes=-",
    ],
)
async def test_range_that_is_not_one_valid_range_is_ignored(api: Client, range_header: str) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(100)
    d = await api.push_blob(repo, data)
    r = await api.get(blob_path(repo, d), headers={"Range": range_header})
    assert r.status == 200 and r.body == data, r
    assert "Content-Range" not in r.headers, r


async def test_blob_etag_is_the_digest(api: Client) -> None:
    """One validator for the blob, whatever the answer: its quoted digest."""
    repo = oci.repo_name()
    data = oci.blob_bytes(1000)
    d = await api.push_blob(repo, data)
    for method, headers, status in [
        ("GET", {}, 200),
        ("HEAD", {}, 200),
        ("GET", {"Range": "bytes=10-19"}, 206),
        ("HEAD", {"Range": "bytes=10-19"}, 206),
    ]:
        r = await api.req(method, blob_path(repo, d), headers=headers)
        assert r.status == status, r
        assert r.headers["ETag"] == f'"{d}"', r
        assert "Last-Modified" not in r.headers, r


async def test_blob_conditional_requests(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(1000)
    d = await api.push_blob(repo, data)
    r = await api.get(blob_path(repo, d), headers={"If-None-Match": f'"{d}"'})
    assert r.status == 304 and r.body == b"", r
    r = await api.get(blob_path(repo, d), headers={"If-None-Match": '"other"'})
    assert r.status == 200 and r.body == data, r
    # If-Range naming the blob keeps the range; anything else sends it whole.
    r = await api.get(blob_path(repo, d), headers={"Range": "bytes=0-9", "If-Range": f'"{d}"'})
    assert r.status == 206 and r.body == data[:10], r
    r = await api.get(blob_path(repo, d), headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert r.status == 200 and r.body == data, r


async def test_delete_blob(api: Client) -> None:
    repo = oci.repo_name()
    keep = await api.push_blob(repo, oci.blob_bytes())
    d = await api.push_blob(repo, oci.blob_bytes())

    r = await api.delete(blob_path(repo, d))
    assert r.status == 202, r

    assert_error(await api.get(blob_path(repo, d)), 404, "BLOB_UNKNOWN")
    assert_error(await api.head(blob_path(repo, d)), 404)
    assert_error(await api.delete(blob_path(repo, d)), 404, "BLOB_UNKNOWN")
    # Other blobs of the repository are untouched.
    assert (await api.head(blob_path(repo, keep))).status == 200


async def test_delete_blob_only_in_that_repository(api: Client) -> None:
    a, b = oci.repo_name(), oci.repo_name()
    data = oci.blob_bytes()
    d = await api.push_blob(a, data)
    await api.push_blob(b, data)
    assert (await api.delete(blob_path(a, d))).status == 202
    assert_error(await api.head(blob_path(a, d)), 404)
    r = await api.get(blob_path(b, d))
    assert r.status == 200 and r.body == data, r


async def test_unknown_blob(api: Client) -> None:
    repo = oci.repo_name()
    await api.push_blob(repo, oci.blob_bytes())
    d = oci.unknown_digest()
    assert_error(await api.get(blob_path(repo, d)), 404, "BLOB_UNKNOWN")
    assert_error(await api.head(blob_path(repo, d)), 404)
    assert_error(await api.delete(blob_path(repo, d)), 404, "BLOB_UNKNOWN")


async def test_unknown_blob_in_unknown_repository(api: Client) -> None:
    repo = oci.repo_name()
    d = oci.unknown_digest()
    r = await api.get(blob_path(repo, d))
    assert_error(r, 404, "BLOB_UNKNOWN", "NAME_UNKNOWN")
    assert_error(await api.head(blob_path(repo, d)), 404)


@pytest.mark.parametrize("bad", MALFORMED_DIGESTS)
@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
async def test_malformed_digest(api: Client, method: str, bad: str) -> None:
    repo = oci.repo_name()
    await api.push_blob(repo, oci.blob_bytes())
    r = await api.req(method, blob_path(repo, bad))
    assert_error(r, 400, "DIGEST_INVALID")


async def test_sha512_blob(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes(5000)
    d = await api.push_blob(repo, data, alg="sha512")
    assert d.startswith("sha512:") and len(d) == 7 + 128

    r = await api.head(blob_path(repo, d))
    assert r.status == 200, r
    _check_blob_headers(r, d, len(data))
    r = await api.get(blob_path(repo, d))
    assert r.status == 200 and r.body == data, r
    assert r.headers["Docker-Content-Digest"] == d
    r = await api.get(blob_path(repo, d), headers={"Range": "bytes=4990-"})
    assert r.status == 206 and r.body == data[4990:], r
    # The sha256 digest of the same bytes was never pushed to this repository.
    assert_error(await api.head(blob_path(repo, oci.digest(data))), 404)
    assert (await api.delete(blob_path(repo, d))).status == 202
    assert_error(await api.get(blob_path(repo, d)), 404, "BLOB_UNKNOWN")


async def test_sha512_image_end_to_end(api: Client) -> None:
    """Blobs and manifest addressed by sha512 (the tag resolves to the
    digest the registry computed with its canonical algorithm)."""
    repo = oci.repo_name()
    img = oci.image(2, alg="sha512")
    await api.push(repo, img)  # PUT /manifests/sha512:...
    r = await api.get(oci.manifest_path(repo, img.digest))
    assert r.status == 200, r
    assert r.body == img.body
    assert r.headers["Docker-Content-Digest"] == img.digest
    for b in img.blobs:
        r = await api.get(blob_path(repo, oci.digest(b, "sha512")))
        assert r.status == 200 and r.body == b, r


async def test_empty_blob(api: Client) -> None:
    repo = oci.repo_name()
    d = await api.push_blob(repo, b"")
    assert d == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    r = await api.head(blob_path(repo, d))
    assert r.status == 200, r
    _check_blob_headers(r, d, 0)
    r = await api.get(blob_path(repo, d))
    assert r.status == 200 and r.body == b"", r
    _check_blob_headers(r, d, 0)
    r = await api.get(blob_path(repo, d), headers={"Range": "bytes=0-"})
    assert r.status == 416, r


async def test_empty_blob_post_then_put(api: Client) -> None:
    repo = oci.repo_name()
    up = await api.start_upload(repo)
    d = oci.digest(b"", "sha512")
    r = await api.put(up.location, params={"digest": d})
    assert r.status == 201, r
    r = await api.get(blob_path(repo, d))
    assert r.status == 200 and r.body == b"", r


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_blob_unsupported_methods(api: Client, method: str) -> None:
    repo = oci.repo_name()
    d = await api.push_blob(repo, oci.blob_bytes())
    r = await api.req(method, blob_path(repo, d), data=b"x")
    assert_error(r, 405, "UNSUPPORTED")
    assert (await api.get(blob_path(repo, d))).status == 200


async def test_range_with_unknown_unit_is_ignored(api: Client) -> None:
    """RFC 9110 14.2: a server MUST ignore a Range header with a range unit it
    does not understand (so the whole blob is served)."""
    repo = oci.repo_name()
    data = oci.blob_bytes(100)
    d = await api.push_blob(repo, data)
    r = await api.get(blob_path(repo, d), headers={"Range": "items=0-1"})
    assert r.status == 200, r
    assert r.body == data


async def test_deleted_blob_can_be_pushed_again(api: Client) -> None:
    repo = oci.repo_name()
    data = oci.blob_bytes()
    d = await api.push_blob(repo, data)
    assert (await api.delete(blob_path(repo, d))).status == 202
    assert await api.push_blob(repo, data) == d
    r = await api.get(blob_path(repo, d))
    assert r.status == 200 and r.body == data, r
