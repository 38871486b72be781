"""Tags list and catalog: sorting, n/last pagination, Link headers, errors."""

from __future__ import annotations

import re
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest

from tests import oci
from tests.oci import Client, assert_error

reg_node = oci.module_node_fixture("listing")
api = oci.client_fixture()

LINK_RE = re.compile(r'^<(?P<url>[^>]+)>;\s*rel="next"$')
TAGS = ["v10", "latest", "1.0", "B", "a", "v9", "_x", "1.0-rc1", "b", "A1"]


async def _tagged_repo(api: Client, tags: list[str]) -> str:
    repo = oci.repo_name()
    m = oci.image(1)
    await api.push(repo, m, tags[0])
    for t in tags[1:]:
        r = await api.put_manifest(repo, t, m.body, m.media_type)
        assert r.status == 201, r
    return repo


def _next_link(r: oci.Resp) -> str | None:
    link = r.headers.get("Link")
    if link is None:
        return None
    m = LINK_RE.match(link)
    assert m, f"malformed Link header {link!r}"
    return m.group("url")


async def _walk(api: Client, first: str, key: str) -> tuple[list[list[str]], list[str]]:
    """Follow Link headers from ``first``; return the pages and the links."""
    pages: list[list[str]] = []
    links: list[str] = []
    url: str | None = first
    while url is not None:
        r = await api.get(url)
        assert r.status == 200, r
        pages.append(r.json()[key])
        url = _next_link(r)
        if url is not None:
            links.append(url)
        assert len(pages) < 100, "pagination does not end"
    return pages, links


# -- tags -----------------------------------------------------------------------


async def test_tags_list_sorted(api: Client) -> None:
    repo = await _tagged_repo(api, TAGS)
    r = await api.get(f"/v2/{repo}/tags/list")
    assert r.status == 200, r
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body == {"name": repo, "tags": sorted(TAGS)}, r
    assert "Link" not in r.headers


@pytest.mark.parametrize("n", [1, 2, 3, 9])
async def test_tags_pagination_follows_links(api: Client, n: int) -> None:
    repo = await _tagged_repo(api, TAGS)
    pages, links = await _walk(api, f"/v2/{repo}/tags/list?n={n}", "tags")
    assert [t for p in pages for t in p] == sorted(TAGS)
    assert all(len(p) == n for p in pages[:-1])
    assert 1 <= len(pages[-1]) <= n
    assert len(links) == len(pages) - 1
    for link in links:
        parts = urlsplit(link)
        assert parts.path == f"/v2/{repo}/tags/list", link
        q = parse_qs(parts.query)
        assert q["n"] == [str(n)], link
        assert len(q["last"]) == 1


async def test_tags_n_equal_to_count_has_no_link(api: Client) -> None:
    repo = await _tagged_repo(api, TAGS)
    for n in (len(TAGS), len(TAGS) + 1, 10_000):
        r = await api.get(f"/v2/{repo}/tags/list", params={"n": n})
        assert r.status == 200, r
        assert r.json()["tags"] == sorted(TAGS)
        assert "Link" not in r.headers, r


async def test_tags_n_zero(api: Client) -> None:
    repo = await _tagged_repo(api, TAGS)
    r = await api.get(f"/v2/{repo}/tags/list", params={"n": 0})
    assert r.status == 200, r
    assert r.json()["tags"] in ([], None), r
    assert r.json()["name"] == repo


async def test_tags_last(api: Client) -> None:
    repo = await _tagged_repo(api, TAGS)
    ordered = sorted(TAGS)
    r = await api.get(f"/v2/{repo}/tags/list", params={"last": ordered[3]})
    assert r.status == 200 and r.json()["tags"] == ordered[4:], r
    r = await api.get(f"/v2/{repo}/tags/list", params={"last": ordered[3], "n": 2})
    assert r.status == 200 and r.json()["tags"] == ordered[4:6], r
    assert _next_link(r) is not None
    # ``last`` need not be an existing tag; the list continues after it.
    r = await api.get(f"/v2/{repo}/tags/list", params={"last": "1.0-rc0"})
    assert r.json()["tags"] == [t for t in ordered if t > "1.0-rc0"], r
    r = await api.get(f"/v2/{repo}/tags/list", params={"last": ordered[-1]})
    assert r.status == 200 and r.json()["tags"] == [], r
    assert "Link" not in r.headers


@pytest.mark.parametrize("n", ["-1", "abc", "1.5", "", "0x10"])
async def test_tags_invalid_n(api: Client, n: str) -> None:
    repo = await _tagged_repo(api, ["v1"])
    r = await api.get(f"/v2/{repo}/tags/list?n={n}")
    assert_error(r, 400, "PAGINATION_NUMBER_INVALID")


async def test_tags_unknown_repository(api: Client) -> None:
    r = await api.get(f"/v2/{oci.repo_name()}/tags/list")
    assert_error(r, 404, "NAME_UNKNOWN")


async def test_tags_follow_deletes_and_moves(api: Client) -> None:
    repo = await _tagged_repo(api, ["a", "b", "c"])
    assert (await api.delete(oci.manifest_path(repo, "b"))).status == 202
    r = await api.get(f"/v2/{repo}/tags/list")
    assert r.json()["tags"] == ["a", "c"], r
    await api.push(repo, oci.image(1), "d")
    r = await api.get(f"/v2/{repo}/tags/list")
    assert r.json()["tags"] == ["a", "c", "d"], r


async def test_tags_of_untagged_repository(api: Client) -> None:
    repo = oci.repo_name()
    await api.push(repo, oci.image(1))  # by digest only
    r = await api.get(f"/v2/{repo}/tags/list")
    assert r.status == 200, r
    assert r.json()["tags"] in ([], None), r


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_tags_list_unsupported_methods(api: Client, method: str) -> None:
    repo = await _tagged_repo(api, ["v1"])
    assert_error(await api.req(method, f"/v2/{repo}/tags/list"), 405, "UNSUPPORTED")


# -- catalog -----------------------------------------------------------------------


async def _catalog_repos(api: Client, count: int) -> list[str]:
    """``count`` new repositories with a manifest, sharing a unique prefix."""
    prefix = f"cat{uuid.uuid4().hex[:8]}"
    repos = [f"{prefix}/r{i:02d}" for i in range(count)]
    for repo in reversed(repos):
        await api.push(repo, oci.image(1), "v1")
    return repos


async def test_catalog_lists_sorted_repositories(api: Client) -> None:
    repos = await _catalog_repos(api, 4)
    nested = f"{repos[0]}/nested/deeper"
    await api.push(nested, oci.image(1), "v1")
    r = await api.get("/v2/_catalog")
    assert r.status == 200, r
    assert r.headers["Content-Type"].startswith("application/json")
    listed = r.json()["repositories"]
    assert listed == sorted(listed)
    assert len(listed) == len(set(listed))
    for repo in (*repos, nested):
        assert repo in listed
    assert "Link" not in r.headers


@pytest.mark.parametrize("n", [1, 2, 5])
async def test_catalog_pagination_follows_links(api: Client, n: int) -> None:
    await _catalog_repos(api, 5)
    full = (await api.get("/v2/_catalog")).json()["repositories"]
    pages, links = await _walk(api, f"/v2/_catalog?n={n}", "repositories")
    assert [x for p in pages for x in p] == full
    assert all(len(p) == n for p in pages[:-1])
    assert len(links) == len(pages) - 1
    for link in links:
        parts = urlsplit(link)
        assert parts.path == "/v2/_catalog", link
        assert parse_qs(parts.query)["n"] == [str(n)]


async def test_catalog_last(api: Client) -> None:
    repos = await _catalog_repos(api, 5)
    r = await api.get("/v2/_catalog", params={"last": repos[1], "n": 2})
    assert r.status == 200, r
    assert r.json()["repositories"] == repos[2:4], r
    url = _next_link(r)
    assert url is not None
    assert parse_qs(urlsplit(url).query)["last"] == [repos[3]]
    r = await api.get(url)
    assert r.json()["repositories"][0] == repos[4], r


async def test_catalog_n_zero(api: Client) -> None:
    await _catalog_repos(api, 1)
    r = await api.get("/v2/_catalog", params={"n": 0})
    assert r.status == 200, r
    assert r.json()["repositories"] in ([], None), r


@pytest.mark.parametrize("n", ["-1", "abc", "1.5", ""])
async def test_catalog_invalid_n(api: Client, n: str) -> None:
    assert_error(await api.get(f"/v2/_catalog?n={n}"), 400, "PAGINATION_NUMBER_INVALID")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_catalog_unsupported_methods(api: Client, method: str) -> None:
    assert_error(await api.req(method, "/v2/_catalog"), 405, "UNSUPPORTED")
