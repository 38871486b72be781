"""Single-node benchmark: Meridian against CNCF Distribution, side by side.

    python -m loadtest.bench_node [--quick|--toy] [--targets distribution,meridian]

A thin entry point over the harness: it runs the ``node`` scenario
(``meridian loadtest node``: manifest GET by tag and blob HEAD with wrk/ab,
one blob GET one at a time and 4 at once with curl, a skopeo push of a fresh
5-layer image; see :class:`loadtest.scenarios.Node`) on both registries in
one interleaved run, with its profiles:

- default (full): 5 rounds, 20k requests per rate step, 100 MiB blob;
- ``--quick``: 3 rounds, 5k requests, 3 sequential and 4 parallel downloads;
- ``--toy``: seconds (what the smoke test runs).

Its other flags are the scenario's (``--requests``, ``--concurrency``,
``--blob-size``, ``--loadgen`` ...) and the harness's (``--workdir``,
``--keep``, ``--rounds``); ``--targets A,B`` is ``--start A --start B`` and
``--out FILE`` the result file (``--json``; the HTML report beside it).
"""

from __future__ import annotations

import sys

from loadtest.cli import DEFAULT_OUT, scenario_main

PROFILES = {
    "full": ["--rounds", "5"],
    "quick": ["--rounds", "3", "--requests", "5000", "--downloads", "3"]
    + ["--parallel-downloads", "4", "--warmup", "1000"],
    "toy": ["--toy"],
}
DEFAULT_JSON = DEFAULT_OUT.parent / "bench_node.json"


def translate(argv: list[str]) -> list[str]:
    """``bench_node``'s command line as the ``node`` scenario's: the
    profile's values first, so that explicit flags after them win."""
    profile = "full"
    out: list[str] = []
    json_given = False
    args = iter(argv)
    for a in args:
        if a in ("--quick", "--toy"):
            profile = a[2:]
        elif a == "--targets" or a.startswith("--targets="):
            value = a.partition("=")[2] if "=" in a else next(args, "")
            for t in value.split(","):
                if t.strip():
                    out += ["--start", t.strip()]
        elif a == "--out" or a.startswith("--out="):
            out += ["--json", a.partition("=")[2] if "=" in a else next(args, "")]
            json_given = True
        else:
            out.append(a)
            json_given = json_given or a == "--json" or a.startswith("--json=")
    if not json_given:
        out += ["--json", str(DEFAULT_JSON)]
    return [*PROFILES[profile], *out]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
    return scenario_main("node", translate(argv), prog="python -m loadtest.bench_node")


if __name__ == "__main__":
    sys.exit(main())
