"""Push latency with and without a slow webhook receiver, side by side.

    python -m loadtest.bench_webhooks [--rounds 10] [--layer-size 256K]
        [--receiver-delay 5] [--workdir DIR] [--out results/bench_webhooks.json]

A push writes its webhook events to the namespace before it is answered and
never waits for a receiver (issue 13): this measures that claim. Real
processes: one ``meridian node`` (embedded namespace, authentication on,
the owner password ``$MERIDIAN_OWNER_PASSWORD`` or a random one given to it
by environment), stopped by PID at the end; the receiver is an HTTP server
in this process that answers every delivery after ``--receiver-delay``
seconds. A webhook (action push) points at it.

Three series, side by side: no webhook enabled; a webhook to a receiver
that answers at once; a webhook to the slow one. Each round pushes one
fresh image per series (one layer of ``--layer-size`` random bytes and a
config), in an order that rotates every round, so the series see the same
machine at the same time; between pushes only the webhooks' status changes.
Reported per series: the manifest PUT's latency (the request whose
transaction writes the events) and the whole push's, median and p95, and
the ratios of the medians: slow/fast is the receiver's effect (the claim:
about 1), fast/none the cost of writing the event with the push; and how
many deliveries the slow receiver got while the run lasted (it is sent one
at a time, in order, each taking ``--receiver-delay``).

Prints a table and writes JSON (schema ``meridian.bench_webhooks/1``).
Figures are what this machine did in this run, not thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from cluster.auth.secrets import generate
from cluster.runtime import free_port
from cluster.units import parse_size
from loadtest.ocipush import OciClient, TokenAuth, random_image
from localcluster.supervisor import meridian_argv, registry_answers, spawn

SCHEMA = "meridian.bench_webhooks/1"
HOOKS = {"fast": "benchfast", "slow": "benchslow"}
SERIES = ("none", "fast", "slow")


class SlowReceiver:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.port = free_port()
        self.received = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(self.delay)
        self.received += 1
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def manage(
    s: aiohttp.ClientSession, base: str, method: str, path: str, body: dict[str, Any]
) -> None:
    url = f"{base}/meridian/v1/registries/default/webhooks{path}"
    basic = base64.b64encode(f"{OWNER}:{os.environ[OWNER_PASSWORD_ENV]}".encode()).decode()
    async with s.request(method, url, json=body, headers={"Authorization": "Basic " + basic}) as r:
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {r.status} {(await r.text())[:200]}")


async def push_once(client: OciClient, repo: str, tag: str, layer_size: int) -> dict[str, float]:
    image = random_image(1, layer_size)
    t0 = time.perf_counter()
    for digest, data in image.blobs():
        await client.upload_blob(repo, data, digest)
    t1 = time.perf_counter()
    await client.put_manifest(repo, tag, image.manifest)
    t2 = time.perf_counter()
    return {"manifest_put_ms": (t2 - t1) * 1000, "push_ms": (t2 - t0) * 1000}


def summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(samples)}
    for key in ("manifest_put_ms", "push_ms"):
        values = sorted(s[key] for s in samples)
        p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
        out[key] = {"median": round(statistics.median(values), 3), "p95": round(p95, 3)}
    return out


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    os.environ.setdefault(OWNER_PASSWORD_ENV, generate())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = meridian_argv(
        "node", "--listen", f"127.0.0.1:{port}", "--data", str(workdir / "data"),
        "--region", "bench", "--webhook-timeout", str(args.receiver_delay * 3),
    )  # fmt: skip
    node = spawn("node", argv, workdir / "node.log", env=dict(os.environ))
    receivers = {"fast": SlowReceiver(0.0), "slow": SlowReceiver(args.receiver_delay)}
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in SERIES}
    auth = TokenAuth(OWNER, os.environ[OWNER_PASSWORD_ENV])
    try:
        await asyncio.to_thread(node.wait_ready, url=base + "/v2/", ok=registry_answers, timeout=30)
        for r in receivers.values():
            await r.start()
        timeout = aiohttp.ClientTimeout(total=120)
        async with (
            aiohttp.ClientSession(timeout=timeout) as plain,
            aiohttp.ClientSession(timeout=timeout, middlewares=(auth,)) as s,
        ):
            for kind, name in HOOKS.items():
                body = {
                    "name": name,
                    "uri": receivers[kind].url,
                    "actions": ["push"],
                    "status": "disabled",
                }
                await manage(plain, base, "POST", "", body)
            client = OciClient(base, s)
            await push_once(client, "bench/warm", "w", args.layer_size)  # warm-up: not counted
            for i in range(args.rounds):
                for j in range(len(SERIES)):
                    series = SERIES[(i + j) % len(SERIES)]
                    for kind, name in HOOKS.items():
                        status = "enabled" if kind == series else "disabled"
                        await manage(plain, base, "PATCH", f"/{name}", {"status": status})
                    got = await push_once(client, "bench/app", f"{series}-{i}", args.layer_size)
                    samples[series].append(got)
    finally:
        for r in receivers.values():
            await r.stop()
        node.stop()
    sums = {k: summary(v) for k, v in samples.items()}

    def ratio(a: str, b: str) -> dict[str, float | None]:
        return {
            k: round(sums[a][k]["median"] / sums[b][k]["median"], 3)
            if sums[b][k]["median"] > 0
            else None
            for k in ("manifest_put_ms", "push_ms")
        }

    return {
        "schema": SCHEMA,
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {
            "rounds": args.rounds,
            "layer_size": args.layer_size,
            "receiver_delay_s": args.receiver_delay,
        },
        "auth": {"user": OWNER, "tokens_fetched": auth.fetched},
        "pids": {"node": node.pid},
        "series": sums,
        "ratio_median": {"slow/fast": ratio("slow", "fast"), "fast/none": ratio("fast", "none")},
        "deliveries_received_during_run": {k: r.received for k, r in receivers.items()},
        "samples": samples,
    }


def table(res: dict[str, Any]) -> str:
    lines = [
        f"push latency, {res['settings']['rounds']} rounds; the slow receiver answers after "
        f"{res['settings']['receiver_delay_s']:g} s",
        f"{'series':<24}{'manifest PUT p50':>18}{'p95':>10}{'push p50':>12}{'p95':>10}",
    ]
    names = {
        "none": "no webhook",
        "fast": "webhook, fast receiver",
        "slow": "webhook, slow receiver",
    }
    for key in SERIES:
        put, whole = res["series"][key]["manifest_put_ms"], res["series"][key]["push_ms"]
        lines.append(
            f"{names[key]:<24}{put['median']:>15.2f} ms{put['p95']:>7.2f}"
            f"{whole['median']:>9.2f} ms{whole['p95']:>7.2f}"
        )
    for which, r in res["ratio_median"].items():
        lines.append(
            f"ratio {which} (medians): manifest PUT {r['manifest_put_ms']}, push {r['push_ms']}"
        )
    got = res["deliveries_received_during_run"]
    lines.append(f"deliveries received during the run: fast {got['fast']}, slow {got['slow']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_webhooks", description=__doc__)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--layer-size", type=parse_size, default=256 << 10)
    p.add_argument("--receiver-delay", type=float, default=5.0)
    p.add_argument("--workdir", type=Path, help="where the node keeps its data and log")
    p.add_argument("--out", type=Path, default=Path("results/bench_webhooks.json"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    res = asyncio.run(run(args, workdir))
    print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
