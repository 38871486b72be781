"""The ``meridian`` command: a thin dispatcher. Each subcommand's package is
imported only when that subcommand runs."""

from __future__ import annotations

import os
import sys


def _node(argv: list[str]) -> int:
    from cluster import preflight
    from node import config
    from node.app import run

    p = preflight.Parser(prog="meridian node", description="run one registry node")
    config.add_arguments(p)
    cfg = config.from_args(p.parse_args(argv))
    listens = {"--listen": cfg.listen, "--grpc-listen": cfg.grpc_listen}
    preflight.check_listen_flags(p, listens)
    if os.environ.get("MERIDIAN_WORKER_INDEX", "0") != "0":
        # A worker (cluster.workers): its primary checked the data dir and holds the ports.
        return preflight.answer("meridian node", lambda: run(cfg) or preflight.OK)
    return preflight.answer(
        "meridian node", lambda: preflight.serve(cfg.data, listens, lambda: run(cfg))
    )


def _regions(argv: list[str]) -> int:
    from cluster.admin import regions_main

    return regions_main(argv)


def _replication(argv: list[str]) -> int:
    from cluster.replicas_cli import replication_main

    return replication_main(argv)


def _usage(argv: list[str]) -> int:
    from cluster.replicas_cli import usage_main

    return usage_main(argv)


def _router(argv: list[str]) -> int:
    from cluster.router.app import router_main

    return router_main(argv)


def _up(argv: list[str]) -> int:
    from localcluster.up import up_main

    return up_main(argv)


def _login(argv: list[str]) -> int:
    from cluster.manage_cli import login_main

    return login_main(argv)


def _logout(argv: list[str]) -> int:
    from cluster.manage_cli import logout_main

    return logout_main(argv)


def _group(name: str):  # noqa: ANN202 - the identity verbs (cluster/manage_cli.py)
    def run(argv: list[str]) -> int:
        from cluster.manage_cli import group_main

        return group_main(name, argv)

    return run


def _import(argv: list[str]) -> int:
    from cluster.import_cli import main as import_main

    return import_main(argv)


def _loadtest(argv: list[str]) -> int:
    from loadtest.cli import main as loadtest_main

    return loadtest_main(argv)


COMMANDS = {
    "node": (_node, "run one registry node (standalone, or one region of a cluster)"),
    "regions": (_regions, "list the cluster's regions, their endpoints and liveness"),
    "replication": (
        _replication,
        "a registry's replications: create, list, delete; status (no verb): every region's backlog",
    ),
    "region": (_group("region"), "decommission a region: remove (cluster owner)"),
    "usage": (_usage, "a registry's usage: bytes stored, GiB-days, pushes, pulls, bytes served"),
    "router": (_router, "the latency-aware endpoint clients pull from"),
    "up": (_up, "a complete local multi-region cluster (etcd, regions, WAN emulator, router)"),
    "login": (_login, "log in to a server; credentials stored as docker stores them"),
    "logout": (_logout, "forget a server's stored credentials"),
    "sp": (_group("sp"), "service principals: create, list, show, delete (cluster owner)"),
    "token": (_group("token"), "a registry's repository-scoped tokens"),
    "scope-map": (_group("scope-map"), "a registry's scope maps: what tokens may do"),
    "credential": (_group("credential"), "a registry's admin user: show, enable, renew"),
    "settings": (_group("settings"), "a registry's anonymous pull and public access"),
    "network-rule": (_group("network-rule"), "the networks a registry accepts clients from"),
    "registry": (_group("registry"), "registries: create, list, show, update, delete; tiers"),
    "webhook": (_group("webhook"), "a registry's webhooks: create, list, show, update, ping"),
    "audit": (_group("audit"), "a registry's audit records: list, export as JSON lines"),
    "import": (_import, "copy an image from any OCI registry into a registry, server-side"),
    "repository": (_group("repository"), "a registry's repositories, tags and locks; delete"),
    "manifest": (_group("manifest"), "a repository's manifests: list, show, lock, delete"),
    "config": (_group("config"), "registry policies: retention of untagged manifests"),
    "loadtest": (_loadtest, "load tests of any OCI registry, with a JSON result and HTML report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"meridian {version('meridian-registry')}")
        except PackageNotFoundError:
            print("meridian (not installed)")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: meridian <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<13} {help_}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    fn, _ = COMMANDS[argv[0]]
    # Failures are one line of Meridian's own (cluster.preflight; servers log theirs):
    # gRPC's C core would add lines of its own from its threads, even after that line.
    # GRPC_VERBOSITY set by the user still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    return fn(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
