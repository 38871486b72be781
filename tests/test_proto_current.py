"""The committed generated modules match what protoc makes from the .proto
files now (regenerate with ``python -m proto.gen``)."""

from __future__ import annotations

from pathlib import Path

from proto import gen


def test_generated_modules_are_current(tmp_path: Path) -> None:
    fresh = gen.generate(tmp_path)
    assert fresh, "proto.gen generated nothing"
    stale = []
    for path in fresh:
        committed = gen.PROTO_DIR / path.name
        if not committed.exists():
            stale.append(f"{committed.name} is missing")
        elif committed.read_bytes() != path.read_bytes():
            stale.append(f"{committed.name} differs")
    assert not stale, (
        "generated protobuf modules are stale (" + ", ".join(stale) + "); "
        "run `python -m proto.gen` and commit the result"
    )


def test_generated_modules_import() -> None:
    from proto import replication_pb2 as pb
    from proto import replication_pb2_grpc as pb_grpc

    chunk = pb.Chunk(offset=3, data=b"abc", crc32=1, total_size=6)
    assert pb.Chunk.FromString(chunk.SerializeToString()) == chunk
    assert hasattr(pb_grpc, "ReplicationStub")
    assert hasattr(pb_grpc, "add_ReplicationServicer_to_server")
