"""The disk tier's write road: the hierarchy hands it an object's header and payload (a view of the
staging slot), written by ``writev`` without joining them. The file must be byte for byte the object
``encode_block`` makes, for every codec, and a short write must never leave a torn object."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from kvtier.cache.codec import CodecConfig, decode_block, encode_block, encode_parts
from kvtier.cache.hierarchy import KVHierarchy
from kvtier.cache.keys import KVLayout
from kvtier.cache.tiers import disk_files
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.loading import BlockIO, EncodedBlock

LAYOUT = KVLayout(2, 2, 8, 16, "bfloat16")
FINGERPRINT = "fp-writev"
CODECS = [CodecConfig(), CodecConfig("int8"), CodecConfig(compression="zstd"), CodecConfig("fp8", "lz4")]


def _block(seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.block_shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("secret", [None, b"s3cret"])
@pytest.mark.parametrize("codec", CODECS, ids=str)
def test_parts_join_to_the_encoded_object(codec: CodecConfig, secret: bytes | None) -> None:
    kv, tokens, key = _block(1), list(range(16)), b"k" * 32
    head, payload = encode_parts(key, FINGERPRINT, LAYOUT, tokens, kv, codec, secret)
    assert head + bytes(payload) == encode_block(key, FINGERPRINT, LAYOUT, tokens, kv, codec, secret)


@pytest.mark.parametrize("codec", CODECS, ids=str)
def test_hierarchy_writes_files_byte_identical_to_encode_block(tmp_path: Path, codec: CodecConfig) -> None:
    disk = DiskTier(tmp_path, "ns", capacity_bytes=1 << 24)
    hierarchy = KVHierarchy([disk], [codec], LAYOUT, FINGERPRINT)
    pool = torch.stack([_block(b) for b in range(4)], dim=2)  # [L, 2, 4, bs, H, D]
    keys = [bytes([b]) * 32 for b in range(4)]
    tokens = [tuple(range(b, b + 16)) for b in range(4)]
    hierarchy.stage_writes(pool, [3, 1], [(keys[3], tokens[3], (0,)), (keys[1], tokens[1], (0,))])
    assert hierarchy.flush(30)
    sizes = 0
    for b in (1, 3):
        with open(disk.path_of(keys[b]), "rb") as f:
            data = f.read()
        sizes += len(data)
        assert data == encode_block(
            keys[b], FINGERPRINT, LAYOUT, tokens[b], pool[:, :, b].contiguous(), codec
        )
        out = decode_block(data, key=keys[b], fingerprint=FINGERPRINT, layout=LAYOUT, tokens=tokens[b])
        if codec == CodecConfig():
            assert torch.equal(out, pool[:, :, b])
    assert disk.stats().bytes_written == sizes
    hierarchy.close()


def test_short_writes_are_finished_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """writev may write less than asked (a signal, a full pipe; rarely on a file): the rest follows."""
    real = os.writev
    calls = []

    def short_writev(fd: int, buffers: Sequence[memoryview]) -> int:
        calls.append(len(buffers))
        return real(fd, [memoryview(buffers[0])[:777]])  # at most 777 bytes of the first buffer

    monkeypatch.setattr(disk_files.os, "writev", short_writev)
    disk = DiskTier(tmp_path, "ns", capacity_bytes=1 << 24)
    io = BlockIO(LAYOUT, FINGERPRINT, CodecConfig(), None, lambda *a: None)
    kv, key, tokens = _block(7), b"w" * 32, list(range(16))
    disk.put_block(key, tokens, kv, None, EncodedBlock(io, key, tokens, kv))
    with open(disk.path_of(key), "rb") as f:
        assert f.read() == encode_block(key, FINGERPRINT, LAYOUT, tokens, kv)
    assert len(calls) > 2


def test_a_failed_write_leaves_no_object_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(fd: int, buffers: Sequence[memoryview]) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_files.os, "writev", full_disk)
    disk = DiskTier(tmp_path, "ns", capacity_bytes=1 << 24)
    io = BlockIO(LAYOUT, FINGERPRINT, CodecConfig(), None, lambda *a: None)
    kv, key, tokens = _block(8), b"f" * 32, list(range(16))
    disk.put_block(key, tokens, kv, None, EncodedBlock(io, key, tokens, kv))
    assert disk.lookup([key]) == 0 and disk.stats().errors == 1
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".kvtier-usage"] == []
