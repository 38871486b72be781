"""A node under more idle and slow connections than its open-file limit
allows (issue 10 item 1): idle keep-alive connections and header tricklers
make room, and a normal client is still served (``cluster/httpserver.py``)."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

from localcluster.supervisor import REPO_ROOT, meridian_argv, registry_answers, spawn
from tests.images import Registry, build_image
from tests.procs import free_port, require_tool

FD_LIMIT = 512


def test_more_connections_than_open_files_a_client_is_still_served(tmp_path: Path) -> None:
    prlimit = require_tool("prlimit")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The default --max-connections (4096) does not fit 512 descriptors: the
    # node fits its cap to the limit, so it sheds before it runs out.
    argv = [
        prlimit,
        f"--nofile={FD_LIMIT}:{FD_LIMIT}",
        *meridian_argv("node", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "d")),
    ]
    child = spawn("node", argv, tmp_path / "node.log", cwd=REPO_ROOT, new_session=False)
    held: list[socket.socket] = []
    try:
        child.wait_ready(url=url + "/v2/", ok=registry_answers, timeout=20)
        for i in range(FD_LIMIT + 100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            if i % 2:
                sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # never the end
            held.append(sock)
        time.sleep(0.5)
        image = build_image([300_000], seed="limits")
        reg = Registry(url)
        reg.push("limits/app", "v1", image)
        status, _, body = reg.request("GET", "/v2/limits/app/manifests/v1")
        assert status == 200 and body == image.manifest
        for b in image.blobs():
            status, _, body = reg.request("GET", f"/v2/limits/app/blobs/{b.digest}")
            assert status == 200 and body == b.data
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'meridian_http_connections_cut_total{reason="shed"}' in metrics
        log = (tmp_path / "node.log").read_text()
        assert "capping at" in log and "Too many open files" not in log
    finally:
        for sock in held:
            sock.close()
        child.stop()
