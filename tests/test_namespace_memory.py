"""The namespace cache's memory per tag (issue 16: at most 1 KiB per tag).

A ``Cache`` is fed 20,000 tags the way a node loads them from the store
(each tag its own manifest record, as ``Namespace.put_manifest`` writes it,
with its tag times; keys and values fresh from bytes, as a range read hands
them), and what it keeps is counted with tracemalloc: bytes, not time, so
the bound is deterministic. The same cache is then read back through the
cache's own API, so the compact forms answer what the records said."""

from __future__ import annotations

import gc
import hashlib
import json
import tracemalloc

from cluster.namespace import (
    Cache,
    ManifestRecord,
    holders,
    manifest_key,
    place_key,
    tag_key,
)
from ocidist.mediatypes import OCI_MANIFEST

REG = "default"
REPOS, TAGS_PER_REPO = 200, 100
# The goal is 1 KiB per tag; the cache keeps about 750 bytes (the code
# before issue 16 kept about 2,000).
BYTES_PER_TAG = 1024
T0 = 1_750_000_000.25


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


CONFIG, LAYER = _digest("config"), _digest("layer")


def _entries() -> list[tuple[bytes, bytes]]:
    """(key, value) as bytes, in the store's key order per repository."""
    out: list[tuple[bytes, bytes]] = []
    for r in range(REPOS):
        repo = f"team{r // 50:03d}/service-{r:04d}"
        for t in range(TAGS_PER_REPO):
            tag, d = f"v1.{t}.0", _digest(f"{repo}:{t}")
            created = T0 + r * TAGS_PER_REPO + t
            rec = ManifestRecord(
                digest=d,
                media_type=OCI_MANIFEST,
                size=527 + t,
                blobs=(CONFIG, LAYER),
                created=created,
                first_pushed=created,
                tagged={tag: [created, created]},
            )
            out.append((manifest_key(REG, repo, d).encode(), rec.to_json()))
            out.append((tag_key(REG, repo, tag).encode(), d.encode()))
    return out


def _load(cache: Cache, entries: list[tuple[bytes, bytes]]) -> None:
    for rev, (k, v) in enumerate(entries, 1):
        cache.apply(k.decode(), bytes(v), rev)
    cache.advance(len(entries))


def test_cache_keeps_at_most_1_kib_per_tag() -> None:
    entries = _entries()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        cache = Cache()
        _load(cache, entries)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = sum(s.size_diff for s in after.compare_to(before, "filename"))
    tags = REPOS * TAGS_PER_REPO
    top = "\n".join(str(s) for s in after.compare_to(before, "lineno")[:8])
    assert kept / tags <= BYTES_PER_TAG, f"{kept / tags:.0f} bytes per tag:\n{top}"
    # what it keeps answers as the records said
    st = cache.registries[REG]
    assert sum(len(rs.tags) for rs in st.repos.values()) == tags
    assert len(cache.revs) == len(entries)


def test_compact_cache_answers_what_the_records_said() -> None:
    entries = _entries()[: 2 * TAGS_PER_REPO]  # one repository
    cache = Cache()
    _load(cache, entries)
    repo = "team000/service-0000"
    rs = cache.registries[REG].repos[repo]
    for rev, (k, v) in enumerate(entries, 1):
        key = k.decode()
        assert cache.revs.get(key) == rev and key in cache.revs
        if "/_m/" in key:
            rec = rs.manifests[key.rsplit("/", 1)[1]]
            assert rec.to_json() == v  # byte for byte, tag times included
        else:
            tag = key.rsplit("/", 1)[1]
            d = v.decode()
            assert rs.tags[tag] == d
            created = rs.manifests[d].created
            assert rs.manifests[d].tag_times(tag) == (created, created)
    assert sorted(cache.revs) == sorted(k.decode() for k, _ in entries)
    # a tag deleted: gone from the tags and the revisions; a later delete is
    # older than nothing: the tombstone keeps a stale put out
    tkey = tag_key(REG, repo, "v1.0.0")
    cache.apply(tkey, None, len(entries) + 1)
    assert "v1.0.0" not in rs.tags and tkey not in cache.revs and cache.revs.get(tkey) is None
    cache.apply(tkey, b"sha256:stale", len(entries))
    assert "v1.0.0" not in rs.tags


def test_many_tag_times_and_malformed_ones_read_back_as_written() -> None:
    d = _digest("many")
    tagged = {f"t{i}": [T0 + i, T0 + 2 * i] for i in range(20)}  # past the flat form
    many = ManifestRecord(
        digest=d, media_type=OCI_MANIFEST, size=1, created=T0, first_pushed=T0 - 5, tagged=tagged
    )
    back = ManifestRecord.from_json(many.to_json())
    assert json.loads(back.to_json())["tagged"] == tagged
    assert [t for t, _ in back.tag_items()] == list(tagged)  # oldest move first
    assert back.tag_times("t7") == (T0 + 7, T0 + 14)
    assert back.tag_times("absent") == (T0, T0)
    assert back.first_pushed == T0 - 5 and back == many
    # a malformed entry (not a pair) reads back as is; its tag shows the
    # record's time
    raw = json.loads(many.to_json())
    raw["tagged"] = {"odd": [1.0], "ok": [T0 + 1, T0 + 3]}
    odd = ManifestRecord.from_json(json.dumps(raw).encode())
    assert json.loads(odd.to_json())["tagged"] == raw["tagged"]
    assert odd.tag_times("odd") == (T0, T0) and odd.tag_times("ok") == (T0 + 1, T0 + 3)
    # annotations: an empty record shares one read-only mapping; given ones
    # are kept and written back
    ann = ManifestRecord(digest=d, media_type=OCI_MANIFEST, size=1, annotations={"a": "b"})
    assert json.loads(ann.to_json())["annotations"] == {"a": "b"}
    assert dict(many.annotations) == {} and json.loads(many.to_json())["annotations"] == {}


def test_placements_and_holders_follow_puts_and_deletes() -> None:
    cache = Cache()
    d = _digest("shared")
    rev = 0

    def put(key: str, value: bytes | None) -> None:
        nonlocal rev
        rev += 1
        cache.apply(key, value, rev)

    repos = [f"r{i}" for i in range(12)]  # past the tuple form of the holders
    for r in repos:
        put(f"/meridian/reg/{REG}/repo/{r}/_b/{d}", b'{"size": 7}')
    put(place_key(REG, d, "eastus"), b'{"size": 7}')
    put(place_key(REG, d, "westeurope"), b'{"size": 7}')
    st = cache.registries[REG]
    assert st.placements[d] == {"eastus": 7, "westeurope": 7}
    assert cache.revs.get(place_key(REG, d, "westeurope")) == rev
    assert place_key(REG, d, "eastus") in set(cache.revs)
    assert cache.revs.under(f"/meridian/reg/{REG}/place/") == [
        place_key(REG, d, "eastus"),
        place_key(REG, d, "westeurope"),
    ]
    assert st.stored == 7
    for i, r in enumerate(repos):
        put(f"/meridian/reg/{REG}/repo/{r}/_b/{d}", None)
        assert sorted(holders(st.blob_repos.get(d))) == sorted(repos[i + 1 :])
    assert d not in st.blob_repos and st.stored == 0
    put(place_key(REG, d, "eastus"), None)
    assert st.placements[d] == {"westeurope": 7}
    assert place_key(REG, d, "eastus") not in cache.revs
