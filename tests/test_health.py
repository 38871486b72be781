"""The shared pieces between router and node: the latency/health tracker
(``cluster/health.py``) and the node status contract (``cluster/status.py``).
Fast, in-process."""

from __future__ import annotations

import json

import pytest

from cluster.backoff import Backoff
from cluster.health import Health
from cluster.status import SCHEMA, NodeStatus


def test_rtt_is_smoothed_and_p95_tracks_the_tail() -> None:
    h = Health("r")
    assert h.srtt is None and h.p95 is None
    h.observe(0.010)
    assert h.srtt == pytest.approx(0.010)
    h.observe(0.020)
    assert h.srtt == pytest.approx(0.7 * 0.010 + 0.3 * 0.020)
    for _ in range(62):
        h.observe(0.010)
    h.observe(0.500)  # one stall in 65: above the p95
    for _ in range(8):
        h.observe(0.010)
    assert h.p95 == pytest.approx(0.010)
    for _ in range(8):
        h.observe(0.300)
    assert h.p95 == pytest.approx(0.300)  # 8 of the last 64 samples: the tail moved


def test_up_after_good_probes_down_at_the_first_failed_one() -> None:
    h = Health("r", up_after=2)
    assert not h.up and h.reason == "not probed yet"
    assert h.probe_ok(0.01) is True  # first sight, never failed: at once
    assert h.up and h.reason == "healthy"
    assert h.probe_failed("probe timed out") is True
    assert not h.up and h.reason == "probe timed out"
    assert h.srtt is None  # the stalls are forgotten
    assert h.probe_ok(0.03) is False  # one good probe is not enough now
    assert h.probe_ok(0.02) is True
    assert h.up and h.srtt == pytest.approx(0.02)  # seeded from the best probe
    assert (h.probes, h.probe_failures) == (4, 1)


def test_requests_fatal_at_once_server_errors_after_a_streak() -> None:
    h = Health("r", fail_after=3)
    h.probe_ok(0.01)
    assert h.request_failed("answered 500", fatal=False) is False
    assert h.request_failed("answered 500", fatal=False) is False
    h.request_ok(0.01)  # an answer breaks the streak
    assert h.request_failed("answered 500", fatal=False) is False
    assert h.request_failed("answered 500", fatal=False) is False
    assert h.request_failed("answered 502", fatal=False) is True
    assert not h.up and h.reason == "answered 502" and h.errors == 5
    h2 = Health("r")
    h2.probe_ok(0.01)
    assert h2.request_failed("cannot connect", fatal=True) is True


def test_slow_only_raises_the_estimate() -> None:
    h = Health("r")
    assert h.slow(0.2) is True and h.srtt == pytest.approx(0.2)
    assert h.slow(0.1) is False and h.srtt == pytest.approx(0.2)


def test_hold_off_backs_off_and_a_good_probe_lifts_it() -> None:
    h = Health("r", up=True, up_after=1, hold=Backoff(base=1.0, cap=10.0))
    assert not h.held()
    assert [h.transfer_failed() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert h.held()
    h.probe_ok(0.01)  # lifts the current hold-off ...
    assert not h.held()
    assert h.transfer_failed() == 10.0  # ... but keeps its escalation
    h.transfer_ok()
    assert not h.held() and h.transfer_failed() == 1.0


def test_status_round_trip_and_contract() -> None:
    st = NodeStatus(
        region="eastus",
        peers_rtt_s={"westeurope": 0.041, "southeastasia": 0.12},
        backlog_items=3,
        backlog_bytes=12345,
        namespace_synced=True,
    )
    doc = json.loads(st.to_json())
    assert doc == {
        "schema": SCHEMA,
        "region": "eastus",
        "peers_rtt_s": {"southeastasia": 0.12, "westeurope": 0.041},
        "backlog_items": 3,
        "backlog_bytes": 12345,
        "namespace_synced": True,
    }
    assert NodeStatus.from_json(st.to_json()) == st
    # Unknown fields are ignored; nulls mean "no replicator".
    doc.update(backlog_items=None, backlog_bytes=None, future_field={"x": 1})
    back = NodeStatus.from_json(json.dumps(doc))
    assert back.backlog_items is None and back.backlog_bytes is None


def test_status_refuses_what_is_not_one_and_drops_bad_values() -> None:
    for bad in (b"not json", b"[]", b'{"region": "x"}', b'{"schema": 2, "region": "x"}'):
        with pytest.raises(ValueError):
            NodeStatus.from_json(bad)
    with pytest.raises(ValueError):
        NodeStatus.from_json(json.dumps({"schema": SCHEMA, "region": ""}))
    st = NodeStatus.from_json(
        json.dumps(
            {
                "schema": SCHEMA,
                "region": "x",
                "peers_rtt_s": {"a": 0.01, "b": -1, "c": "fast", "d": True, "e": 1e999},
                "backlog_items": -3,
                "backlog_bytes": "many",
            }
        )
    )
    assert st.peers_rtt_s == {"a": 0.01}
    assert st.backlog_items is None and st.backlog_bytes is None
