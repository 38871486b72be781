"""The Dockerfile matches the package (no container engine runs here, so
CI does not build the image): every file it copies exists and is not
excluded by .dockerignore, those files alone build a wheel with every
package and the console script, the entry point is that script, found on
the runtime stage's PATH in the virtualenv the builder made, and the
runtime stage runs as an unprivileged user without build tools."""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def copies(stage) -> list[tuple[list[str], list[str], str]]:
    """(options, sources, destination) of each COPY."""
    out = []
    for word, rest in stage:
        if word == "COPY":
            parts = shlex.split(rest)
            opts = [p for p in parts if p.startswith("--")]
            paths = [p for p in parts if not p.startswith("--")]
            out.append((opts, paths[:-1], paths[-1]))
    return out


def ignored(path: str) -> bool:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = Path(path).parts
    return any(
        fnmatch.fnmatch(path, p)
        or fnmatch.fnmatch(parts[0], p)
        or p.startswith("**/")
        and any(fnmatch.fnmatch(x, p[3:]) for x in parts)
        for p in patterns
    )


def build_copies():
    build, *_ = stages()
    return [(src, dest) for opts, srcs, dest in copies(build) if not opts for src in srcs]


def test_every_copied_file_exists_and_is_in_the_context():
    found = build_copies()
    assert found
    for src, _ in found:
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
        assert not ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_the_copied_files_build_the_package(tmp_path):
    """What the Dockerfile copies is enough: a wheel built from those files
    alone holds every package pyproject names and the console script."""
    ctx = tmp_path / "src"
    for src, dest in build_copies():
        # WORKDIR is the context's root; a destination ending in / is a directory
        target = ctx / dest / Path(src).name if dest.endswith("/") else ctx / dest
        if (ROOT / src).is_dir():
            shutil.copytree(
                ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / src, target)
    wheels = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    out = subprocess.run(
        [*cmd, "-w", str(wheels), str(ctx)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert f"{package}/__init__.py" in names, f"{package} missing from the image's wheel"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert f"{script} = {target}" in text


def test_entry_point_is_the_console_script_on_the_runtime_path():
    *_, runtime = stages()
    entry = [json.loads(rest) for word, rest in runtime if word == "ENTRYPOINT"]
    assert entry, "the runtime stage has no ENTRYPOINT"
    (program, *_) = entry[-1]
    assert program in PYPROJECT["project"]["scripts"], program
    # the builder installs into a virtualenv; the runtime copies exactly it and puts its bin on PATH
    build = stages()[0]
    venvs = [
        r.split()[r.split().index("venv") + 1] for w, r in build if w == "RUN" and " venv " in r
    ]
    (venv,) = venvs
    copied = [(opts, srcs, dest) for opts, srcs, dest in copies(runtime)]
    assert copied == [(["--from=build"], [venv], venv)], "only the virtualenv enters the runtime"
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert f"PATH={venv}/bin:" in env


def test_runtime_stage_is_slim_and_unprivileged():
    *_, runtime = stages()
    assert len(stages()) >= 2, "multi-stage"
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root")
    runs = " ".join(rest for word, rest in runtime if word == "RUN")
    for tool in ("gcc", "build-essential", "pip install", "apt-get install"):
        assert tool not in runs, f"the runtime stage installs {tool}"
    args = {
        r.split("=")[0]: r.split("=", 1)[1] for w, r in instructions() if w == "ARG" and "=" in r
    }
    assert "slim" in args.get("PYTHON_IMAGE", ""), "a slim Python base"
