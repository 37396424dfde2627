"""What a tier needs from the hierarchy to load and verify blocks, and the plain way to load them.

``BlockIO`` carries one tier's view of the codec: the model fingerprint, the layout, the secret,
that tier's codec, and where to report a rejected object. ``load_objects`` is the default road of
``Tier.load_into``: fetch encoded objects with ``get``, verify and decode the leading intact ones
into ``out`` (through page-locked staging when ``out`` is on a GPU: one DMA). ``load_in_place`` is
the road of tiers that can read an uncompressed object straight into a header row and the block's
place (the disk tier's ``read_into``): headers are checked on the CPU, checksums where the
payloads landed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvtier.cache.codec import (
    CheckedObject,
    CodecConfig,
    CorruptObjectError,
    check_object,
    decode_block,
    encode_parts,
    header_length,
    payload_sums,
)
from kvtier.cache.keys import BlockKey, KVLayout

if TYPE_CHECKING:
    from kvtier.cache.tiers.base import Tier

ReadInto = Callable[[Sequence[BlockKey], Sequence[Sequence[memoryview]]], list[bool | None]]


@dataclass(frozen=True)
class BlockIO:
    """How blocks are encoded for, and verified from, one tier. ``codec`` None: raw blocks."""

    layout: KVLayout
    fingerprint: str
    codec: CodecConfig | None
    secret: bytes | None
    reject: Callable[[Tier, BlockKey, CorruptObjectError], None]

    @property
    def plain(self) -> bool:
        """Objects are stored unquantized and uncompressed: a reader can take the payload as is."""
        return self.codec == CodecConfig()

    def encode(self, key: BlockKey, tokens: Sequence[int], kv: torch.Tensor) -> bytes:
        return b"".join(self.encode_parts(key, tokens, kv))

    def encode_parts(
        self, key: BlockKey, tokens: Sequence[int], kv: torch.Tensor
    ) -> tuple[bytes, memoryview]:
        """(header, payload) of the object; the payload may be a view of ``kv`` (see ``encode_parts``)."""
        return encode_parts(
            key, self.fingerprint, self.layout, tokens, kv, self.codec or CodecConfig(), self.secret
        )

    def decode_into(
        self, tier: Tier, key: BlockKey, data: bytes | None, tokens: Sequence[int], out: torch.Tensor
    ) -> bool:
        """Decode ``data`` into ``out`` if it is exactly the requested block; else reject, miss."""
        if data is None:
            return False
        try:
            decode_block(
                data,
                key=key,
                fingerprint=self.fingerprint,
                layout=self.layout,
                tokens=tokens,
                secret=self.secret,
                out=out,
            )
            return True
        except CorruptObjectError as e:
            self.reject(tier, key, e)
            return False


class EncodedBlock:
    """One block's stored object in one codec, made when a tier first asks and shared by the tiers
    of that codec (the hierarchy's ``encode`` argument of ``Tier.put_block``). ``parts()`` gives
    (header, payload) without joining them, the payload possibly a view of the block's staging slot
    (valid during the ``put_block`` call only), for a tier that writes them as they are (the disk's
    ``writev``); calling it gives the whole object as ``bytes``, for the others."""

    __slots__ = ("_data", "_io", "_key", "_kv", "_parts", "_tokens")

    def __init__(self, io: BlockIO, key: BlockKey, tokens: Sequence[int], kv: torch.Tensor) -> None:
        self._io, self._key, self._tokens, self._kv = io, key, tokens, kv
        self._parts: tuple[bytes, memoryview] | None = None
        self._data: bytes | None = None

    def parts(self) -> tuple[bytes, memoryview]:
        if self._parts is None:
            self._parts = self._io.encode_parts(self._key, self._tokens, self._kv)
        return self._parts

    def __call__(self) -> bytes:
        if self._data is None:
            self._data = b"".join(self.parts())
        return self._data


def load_objects(
    tier: Tier, keys: Sequence[BlockKey], tokens: Sequence[Sequence[int]], out: torch.Tensor, io: BlockIO
) -> int:
    """Fetch stored objects, verify and decode the leading intact ones into ``out``."""
    datas = tier.get(keys)
    staging = out
    if out.device.type != "cpu":  # decode into page-locked memory, then one DMA
        staging = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    good = 0
    for j, (key, data) in enumerate(zip(keys, datas, strict=True)):
        if not io.decode_into(tier, key, data, tokens[j], staging[j]):
            break
        good += 1
    if staging is not out and good:
        out[:good].copy_(staging[:good], non_blocking=True)
    return good


def load_in_place(
    tier: Tier,
    read_into: ReadInto,
    keys: Sequence[BlockKey],
    tokens: Sequence[Sequence[int]],
    out: torch.Tensor,
    io: BlockIO,
) -> int:
    """Uncompressed objects read by ``read_into`` straight into a header row and the block's place:
    ``out`` itself on the CPU, a page-locked staging row copied to the GPU by one DMA there (no
    ``bytes`` per object, no copy by decode). Objects of another size or codec met on the way are
    read the ordinary way (``load_objects``)."""
    good, other_codec = _read_in_place(tier, read_into, keys, tokens, out, io)
    if other_codec:  # objects written with another codec: read them the usual way
        good += load_objects(tier, keys[good:], tokens[good:], out[good:], io)
    return good


def _read_in_place(
    tier: Tier,
    read_into: ReadInto,
    keys: Sequence[BlockKey],
    tokens: Sequence[Sequence[int]],
    out: torch.Tensor,
    io: BlockIO,
) -> tuple[int, bool]:
    """The leading blocks that verified, and whether the run stopped at an object of another
    size (another codec) that ``get`` must read."""
    n = len(keys)
    head_len = header_length(io.fingerprint, io.layout, io.secret is not None)
    heads = torch.empty((n, head_len), dtype=torch.uint8)
    payloads = (
        torch.empty((n, io.layout.bytes_per_block), dtype=torch.uint8, pin_memory=True)
        if out.is_cuda
        else out.reshape(n, -1).view(torch.uint8)
    )
    views = [(memoryview(h.numpy()), memoryview(p.numpy())) for h, p in zip(heads, payloads, strict=True)]
    found = read_into(keys, views)
    checked: list[CheckedObject] = []
    for j, hit in enumerate(found):
        if not hit:
            break
        try:
            obj = check_object(
                views[j][0],
                key=keys[j],
                fingerprint=io.fingerprint,
                layout=io.layout,
                tokens=tokens[j],
                secret=io.secret,
                payload=views[j][1],
            )
        except CorruptObjectError as e:
            io.reject(tier, keys[j], e)
            break
        if obj.header.compression != "none" or obj.header.quantization != "none":
            # another codec whose payload happens to have the raw size: decode it properly
            return _verify_payloads(tier, keys, checked, payloads, out, io), True
        checked.append(obj)
    good = _verify_payloads(tier, keys, checked, payloads, out, io)
    return good, len(checked) == good < n and found[good] is False


def _verify_payloads(
    tier: Tier,
    keys: Sequence[BlockKey],
    checked: list[CheckedObject],
    payloads: torch.Tensor,
    out: torch.Tensor,
    io: BlockIO,
) -> int:
    """Checksum (and HMAC) of the leading checked objects; on CUDA their payloads go to ``out``
    first and are summed there. Returns how many verified."""
    k = len(checked)
    sums = None
    if out.is_cuda and k:
        dst = out[:k].reshape(k, -1).view(torch.uint8)
        dst.copy_(payloads[:k], non_blocking=True)
        row_sums, col_sums = (t.cpu().numpy() for t in payload_sums(dst))  # waits for the DMA
        sums = [(row_sums[j].tobytes(), col_sums[j].tobytes()) for j in range(k)]
    for j, obj in enumerate(checked):
        try:
            obj.verify_checksum(None if sums is None else sums[j])
            obj.verify_mac(io.secret)
        except CorruptObjectError as e:
            io.reject(tier, keys[j], e)
            return j
    return k
