"""Instructions per request on the small-request paths, counted by callgrind.

Requests per second on a shared 2-core machine swing with whatever else
runs; the instructions a process executes per request do not (valgrind
counts the same total for the same binary and inputs, loaded or not). This
benchmark runs, each under ``valgrind --tool=callgrind`` on loopback:

- the **anchor**: a bare aiohttp handler on uvloop (``loadtest.anchor``), the
  floor of any aiohttp server here;
- a standalone **Meridian node**, authentication on, holding one small
  image.

For each path it warms up, zeroes the counters (``callgrind_control -z``),
sends ``--requests`` keep-alive requests with ``ab`` (``--concurrency`` at
once), dumps the counters, and divides: manifest GET by tag, blob HEAD,
HEAD of a missing blob (a push's layer check), and the anchor's GET. User
space only (the kernel's share of a request is not counted), so the ratio
to the anchor says how much of a request is Meridian's own work.

CNCF Distribution is not in this table: the Go runtime's idle threads spin
under valgrind's serialised scheduling, so its count would say little about
Go on real cores. Its side-by-side figures are ``meridian loadtest compare``'s.

    python -m loadtest.bench_instructions [--requests 2000] [--warmup 300]
        [--concurrency 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from cluster.auth.secrets import generate
from cluster.runtime import free_port
from loadtest.common import BenchError, host_info, write_json
from loadtest.loadgen import LoadgenError, require
from loadtest.ocipush import OCI_MANIFEST, OciClient, TokenAuth, bearer_header, random_image
from localcluster.supervisor import Child, meridian_argv, python_env, registry_answers, spawn

REPO = "bench/instructions"
MISSING = "sha256:" + "ab" * 32
_TOTAL = re.compile(r"^(?:summary|totals):\s*(\d+)", re.M)


class Counted:
    """A process under callgrind whose counters can be zeroed and dumped."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.out = workdir / f"{name}.callgrind"
        self.child: Child = spawn(
            name,
            [
                require("valgrind"),
                "--tool=callgrind",
                f"--callgrind-out-file={self.out}",
                "--dump-instr=no",
                "--collect-jumps=no",
                *argv,
            ],
            workdir / f"{name}.log",
            env=env,
        )
        self.dumps = 0

    def zero(self) -> None:
        self._control("-z")

    def dump(self) -> int:
        """Instructions executed since the last zero."""
        self._control("-d")
        self.dumps += 1
        path = Path(f"{self.out}.{self.dumps}")
        deadline = time.monotonic() + 60
        while True:  # the dump is written by the process, after the control call returns
            text = path.read_text() if path.exists() else ""
            m = _TOTAL.search(text)
            if m:
                return int(m.group(1))
            if time.monotonic() > deadline:
                raise BenchError(f"callgrind wrote no totals to {path}")
            time.sleep(0.2)

    def _control(self, flag: str) -> None:
        proc = subprocess.run(
            [require("callgrind_control"), flag, str(self.child.pid)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"callgrind_control {flag}: {proc.stdout}{proc.stderr}".strip())

    def stop(self) -> None:
        self.child.stop()


def ab(url: str, n: int, concurrency: int, headers: dict[str, str], head: bool) -> dict[str, int]:
    argv = [require("ab"), "-q", "-k", "-n", str(n), "-c", str(concurrency)]
    if head:
        argv.append("-i")
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    proc = subprocess.run([*argv, url], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise BenchError(f"ab failed: {proc.stderr.strip() or proc.stdout[-500:]}")

    def field(label: str) -> int:
        m = re.search(rf"^{label}:\s+(\d+)", proc.stdout, re.M)
        return int(m.group(1)) if m else 0

    return {
        "complete": field("Complete requests"),
        "failed": field("Failed requests"),
        "non_2xx": field("Non-2xx responses"),
    }


def measure(
    target: Counted,
    url: str,
    args: argparse.Namespace,
    headers: dict[str, str],
    *,
    head: bool = False,
    expect_2xx: bool = True,
) -> dict[str, Any]:
    ab(url, args.warmup, args.concurrency, headers, head)
    target.zero()
    res = ab(url, args.requests, args.concurrency, headers, head)
    total = target.dump()
    wrong = res["failed"] + (res["non_2xx"] if expect_2xx else args.requests - res["non_2xx"])
    if res["complete"] != args.requests or wrong:
        raise BenchError(f"{url}: unexpected answers {res} (expected 2xx: {expect_2xx})")
    return {"instructions": total, "per_request": round(total / args.requests)}


async def seed(base: str, auth: TokenAuth) -> str:
    """Push one small image; its first layer's digest."""
    img = random_image(2, 4096, seed="instructions")
    async with aiohttp.ClientSession(middlewares=(auth,)) as s:
        await OciClient(base, s).push_image(REPO, "v1", img)
    return img.layers[0].digest


def run(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("valgrind", "callgrind_control", "ab"):
        require(tool)
    workdir = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    password = generate()
    env = python_env(**{OWNER_PASSWORD_ENV: password})
    result: dict[str, Any] = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "host": host_info(("ab", "valgrind")),
    }
    started: list[Counted] = []
    try:
        port = free_port()
        anchor = Counted(
            "anchor", [sys.executable, "-m", "loadtest.anchor", "--port", str(port)], workdir, env
        )
        started.append(anchor)
        base = f"http://127.0.0.1:{port}"
        anchor.child.wait_ready(url=base + "/v2/a/manifests/b", timeout=args.ready_timeout)
        result["anchor"] = {"manifest_get": measure(anchor, base + "/v2/a/manifests/b", args, {})}
        anchor.stop()

        port = free_port()
        node = Counted(
            "node",
            meridian_argv("node", "--listen", f"127.0.0.1:{port}", "--data", str(workdir / "data")),
            workdir,
            env,
        )
        started.append(node)
        base = f"http://127.0.0.1:{port}"
        node.child.wait_ready(url=base + "/v2/", ok=registry_answers, timeout=args.ready_timeout)
        auth = TokenAuth(OWNER, password)
        layer = asyncio.run(seed(base, auth))
        manifest = f"{base}/v2/{REPO}/manifests/v1"
        blob = f"{base}/v2/{REPO}/blobs/{layer}"
        missing = f"{base}/v2/{REPO}/blobs/{MISSING}"
        bearer = bearer_header(manifest, auth)  # pull scope on the repository
        result["meridian"] = {
            "manifest_get": measure(node, manifest, args, {**bearer, "Accept": OCI_MANIFEST}),
            "blob_head": measure(node, blob, args, bearer, head=True),
            "missing_blob_head": measure(node, missing, args, bearer, head=True, expect_2xx=False),
        }
        node.stop()
    finally:
        for c in started:
            c.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    floor = result["anchor"]["manifest_get"]["per_request"]
    result["x_anchor"] = {
        k: round(v["per_request"] / floor, 2) for k, v in result["meridian"].items()
    }
    return result


def report(res: dict[str, Any]) -> str:
    floor = res["anchor"]["manifest_get"]["per_request"]
    lines = [
        f"instructions per request (callgrind, user space; ab -k -c {res['concurrency']}, "
        f"{res['requests']} requests each)",
        f"  {'anchor: bare aiohttp GET':38} {floor:>10,}   1.00x",
    ]
    labels = {
        "manifest_get": "meridian: manifest GET by tag (auth)",
        "blob_head": "meridian: blob HEAD (auth)",
        "missing_blob_head": "meridian: HEAD of a missing blob (404)",
    }
    for key, label in labels.items():
        per = res["meridian"][key]["per_request"]
        lines.append(f"  {label:38} {per:>10,}   {res['x_anchor'][key]:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=2000, help="requests counted per path")
    p.add_argument("--warmup", type=int, default=300, help="requests before counting")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to start")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 1 or args.concurrency < 1:
        p.error("--requests, --warmup and --concurrency must be at least 1")
    try:
        res = run(args)
    except (BenchError, LoadgenError) as e:
        print(f"bench_instructions: {e}", file=sys.stderr)
        return 2
    print(report(res))
    if args.json:
        write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
