"""The stored object format: round trips, header fields, and every way a bad object must be refused."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import struct
import tracemalloc
from pathlib import Path

import lz4.frame
import numpy as np
import pytest
import torch
import zstandard

from kvtier.cache import codec
from kvtier.cache.codec import (
    FORMAT_VERSION,
    MAGIC,
    BlockHeader,
    CodecConfig,
    CorruptObjectError,
    check_object,
    decode_block,
    encode_block,
    header,
    integrity,
    payload_sums,
    read_header,
    secret_from_env,
)
from kvtier.cache.keys import KVLayout

DTYPES = ("float32", "float16", "bfloat16")
QUANTS = ("none", "fp8", "int8")
COMPS = ("none", "lz4", "zstd")
FP = "model-fingerprint-0123"
KEY_A = hashlib.blake2b(b"a", digest_size=32).digest()
KEY_B = hashlib.blake2b(b"b", digest_size=32).digest()
SECRET = b"tenant secret"
PLAIN = CodecConfig()

# Relative error bounds ||out - in|| / ||in|| for the lossy codecs, measured over 10 seeds x 3 dtypes
# (worst case in parentheses) and backed by the arithmetic:
# - fp8 e4m3 keeps 3 mantissa bits, so rounding costs ~2**-4/sqrt(3) ~ 3.6% of each value at worst and
#   ~2.6% rms; with one scale per (layer, k/v, head) outlier channels do not hurt, since fp8 is
#   floating point (measured 0.0267 normal, 0.0259 with outliers) -> bound 4e-2.
# - int8 with one scale per (layer, k/v, token, head) has step absmax/127; 64 normal values have
#   absmax ~2.5 sigma, so the rms error is ~0.02 sigma / sqrt(12) ~ 0.6% (measured 0.0061) -> 1e-2.
#   Four outlier channels at 20x set absmax to ~30 sigma: step ~0.24, rms error ~0.07 per value
#   against ~sqrt(1660/64) per value of signal, ~1.3% (measured 0.0144) -> 2e-2.
FP8_BOUND = 4e-2
INT8_BOUND = {"normal": 1e-2, "outlier": 2e-2}


def layout_of(dtype: str = "bfloat16") -> KVLayout:
    # bf16: 16 KiB of payload, i.e. several checksum rows of 4 KiB
    return KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)


TOKENS = list(range(100, 116))


def make_kv(layout: KVLayout, seed: int = 0, outliers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layout.block_shape, generator=g)
    if outliers:  # a few head_dim channels 20x larger, like the outlier channels of real K caches
        channels = torch.randperm(layout.head_dim, generator=g)[:4]
        x[..., channels] *= 20
    return x.to(getattr(torch, layout.dtype))


def encode(kv=None, layout=None, key=KEY_A, config=PLAIN, secret=None, tokens=TOKENS) -> bytes:
    layout = layout or layout_of()
    kv = make_kv(layout) if kv is None else kv
    return encode_block(key, FP, layout, tokens, kv, config, secret=secret)


def decode(data, layout=None, key=KEY_A, tokens=TOKENS, secret=None, fingerprint=FP) -> torch.Tensor:
    return decode_block(
        data, key=key, fingerprint=fingerprint, layout=layout or layout_of(), tokens=tokens, secret=secret
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def reject(data, reason: str | None = None, **kw) -> CorruptObjectError:
    with pytest.raises(CorruptObjectError) as info:
        decode(data, **kw)
    if reason is not None:
        assert info.value.reason == reason, str(info.value)
        assert str(info.value).startswith(reason)
    return info.value


def flip(data: bytes, i: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[i] ^= mask
    return bytes(b)


def forge(layout, payload: bytes, *, quant="none", comp="none", raw_length=None, payload_length=None):
    """An object with a valid checksum around an arbitrary payload: what only a bug or an attacker makes."""
    fields = header.pack_fields(
        KEY_A,
        FP,
        layout,
        np.asarray(TOKENS, dtype="<i4").tobytes(),
        quant,
        comp,
        len(payload) if payload_length is None else payload_length,
        len(payload) if raw_length is None else raw_length,
        False,
    )
    head = fields + integrity.checksum(fields, memoryview(payload))
    return head + bytes(header.align(len(head)) - len(head)) + payload


# ---------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("compression", COMPS)
@pytest.mark.parametrize("quantization", QUANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(dtype, quantization, compression):
    layout = layout_of(dtype)
    config = CodecConfig(quantization, compression)
    for kind in ("normal", "outlier"):
        kv = make_kv(layout, seed=3, outliers=kind == "outlier")
        data = encode(kv, layout, config=config)
        out = decode(data, layout)
        assert out.shape == kv.shape and out.dtype == kv.dtype and out.is_contiguous()
        assert out.device.type == "cpu"
        if quantization == "none":
            assert torch.equal(out, kv)
        elif quantization == "fp8":
            assert rel_err(out, kv) < FP8_BOUND
        else:
            assert rel_err(out, kv) < INT8_BOUND[kind]
        header = read_header(data)
        assert (header.quantization, header.compression) == (quantization, compression)


@pytest.mark.parametrize("quantization", QUANTS)
def test_decode_into_a_staging_buffer(quantization):
    """``out=`` gives the same values as a fresh decode, written into every element of the buffer."""
    layout = layout_of("bfloat16")
    data = encode(make_kv(layout, seed=5), layout, config=CodecConfig(quantization, "lz4"))
    staging = torch.full((2, *layout.block_shape), float("nan"), dtype=torch.bfloat16)
    returned = decode_block(data, key=KEY_A, fingerprint=FP, layout=layout, tokens=TOKENS, out=staging[1])
    assert returned.data_ptr() == staging[1].data_ptr()
    assert torch.equal(staging[1], decode(data, layout))
    assert torch.isnan(staging[0]).all()  # the neighbouring slot is untouched
    with pytest.raises(ValueError, match="out must be"):
        decode_block(data, key=KEY_A, fingerprint=FP, layout=layout, tokens=TOKENS, out=staging[:, 0])


def test_round_trip_with_secret_and_buffer_types():
    kv = make_kv(layout_of())
    data = encode(kv, secret=SECRET)
    for view in (data, bytearray(data), memoryview(data), memoryview(bytearray(data))):
        out = decode(view, secret=SECRET)
        assert torch.equal(out, kv)
    out.add_(1)  # the result owns its memory: writable, and the object is untouched
    assert torch.equal(decode(data, secret=SECRET), kv)


def test_non_contiguous_input_and_tokens_optional():
    layout = layout_of("float32")
    kv = make_kv(layout).transpose(2, 3).contiguous().transpose(2, 3)  # same shape, not contiguous
    assert not kv.is_contiguous()
    assert torch.equal(decode(encode(kv, layout), layout, tokens=None), kv)


@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_zero_block_quantizes_to_zero(quantization):
    layout = layout_of()
    kv = torch.zeros(layout.block_shape, dtype=torch.bfloat16)
    out = decode(encode(kv, config=CodecConfig(quantization)))
    assert torch.equal(out, kv)


def test_fp8_keeps_large_and_small_heads():
    # per-head scales: a head of huge values and a head of tiny ones both survive
    layout = layout_of("float32")
    kv = make_kv(layout)
    kv[:, :, :, 0] *= 1e4
    kv[:, :, :, 1] *= 1e-4
    out = decode(encode(kv, layout, config=CodecConfig("fp8")), layout)
    for head in (0, 1):
        assert rel_err(out[:, :, :, head], kv[:, :, :, head]) < FP8_BOUND


def test_none_keeps_exact_bits_even_nan():
    layout = layout_of("float16")
    kv = make_kv(layout)
    kv[0, 0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    out = decode(encode(kv, layout), layout)
    assert torch.equal(out.view(torch.int16), kv.view(torch.int16))


@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_quantizing_non_finite_is_an_argument_error(quantization):
    kv = make_kv(layout_of())
    kv[1, 1, 2, 0, 5] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        encode(kv, config=CodecConfig(quantization))


def test_compression_shrinks_compressible_blocks():
    layout = layout_of("float32")
    kv = torch.zeros(layout.block_shape)
    kv[..., :4] = 1.0
    raw = len(encode(kv, layout))
    for comp in ("lz4", "zstd"):
        assert len(encode(kv, layout, config=CodecConfig(compression=comp))) < raw / 4
    assert len(encode(kv, layout, config=CodecConfig(compression="zstd", level=19))) < raw / 4


# ---------------------------------------------------------------------------------------------------
# header


def test_read_header_fields():
    layout = layout_of("float16")
    data = encode(make_kv(layout), layout, config=CodecConfig("int8", "zstd"), secret=SECRET)
    h = read_header(data)
    assert isinstance(h, BlockHeader)
    assert h.version == FORMAT_VERSION
    assert (h.key, h.fingerprint, h.layout, h.tokens) == (KEY_A, FP, layout, tuple(TOKENS))
    assert (h.quantization, h.compression, h.has_hmac) == ("int8", "zstd", True)
    n_scales = layout.num_layers * 2 * layout.block_size * layout.num_kv_heads
    assert h.raw_length == 4 * n_scales + layout.elements_per_block
    assert h.object_length == len(data) == h.header_length + h.payload_length
    assert h.header_length % 16 == 0 and data[:4] == MAGIC
    # a prefix holding the header is enough; one byte less is truncated
    assert read_header(data[: h.header_length]) == h
    with pytest.raises(CorruptObjectError, match="truncated"):
        read_header(data[: h.header_length - 1])
    plain = read_header(encode())
    assert (plain.has_hmac, plain.raw_length, plain.payload_length) == (False, 16384, 16384)


def test_config_validation_lists_supported_values():
    with pytest.raises(ValueError, match="none, fp8, int8"):
        CodecConfig(quantization="int4")
    with pytest.raises(ValueError, match="none, lz4, zstd"):
        CodecConfig(compression="gzip")
    with pytest.raises(ValueError, match="level"):
        CodecConfig(compression="zstd", level=99)
    with pytest.raises(ValueError, match="level"):
        CodecConfig(compression="lz4", level=17)
    with pytest.raises(ValueError, match="level"):
        CodecConfig(level=3)
    with pytest.raises(ValueError, match="level"):
        CodecConfig(compression="zstd", level=True)
    assert CodecConfig("fp8", "zstd", 1).level == 1


def test_encode_argument_errors():
    layout = layout_of()
    kv = make_kv(layout)
    with pytest.raises(ValueError, match="shape"):
        encode(kv[:1], layout)
    with pytest.raises(ValueError, match="dtype"):
        encode(kv.float(), layout)
    with pytest.raises(ValueError, match="tokens"):
        encode(kv, layout, tokens=TOKENS[:-1])
    with pytest.raises(ValueError, match="int32"):
        encode(kv, layout, tokens=[2**40] * 16)
    with pytest.raises(ValueError, match="supported"):
        encode(kv, KVLayout(2, 2, 64, 16, "int8"))
    with pytest.raises(ValueError, match="secret"):
        encode(kv, layout, secret=b"")
    with pytest.raises(TypeError):
        encode(kv.numpy(), layout)


def test_secret_from_env(monkeypatch):
    monkeypatch.delenv("KVTIER_CACHE_SECRET", raising=False)
    assert secret_from_env() is None
    monkeypatch.setenv("KVTIER_CACHE_SECRET", "")
    assert secret_from_env() is None
    monkeypatch.setenv("KVTIER_CACHE_SECRET", "sécret")
    assert secret_from_env() == "sécret".encode()


# ---------------------------------------------------------------------------------------------------
# rejection


@pytest.mark.parametrize("config", [CodecConfig(), CodecConfig("int8", "zstd"), CodecConfig("fp8", "lz4")])
def test_flipped_payload_byte(config):
    data = encode(config=config)
    start = read_header(data).header_length
    for i in (start, start + 1, (start + len(data)) // 2, len(data) - 1):
        for mask in (0x01, 0x80, 0xFF):
            reject(flip(data, i, mask), "checksum")


def test_every_header_byte_matters():
    for secret in (None, SECRET):
        data = encode(secret=secret)
        for i in range(read_header(data).header_length):
            reject(flip(data, i), secret=secret)


def test_truncated_at_every_sampled_length():
    data = encode(config=CodecConfig("int8", "lz4"), secret=SECRET)
    header_length = read_header(data).header_length
    cuts = {0, 1, 3, 4, 5, 8, 10, header_length - 1, header_length, header_length + 1, len(data) - 1}
    cuts |= set(range(0, header_length, 7)) | set(range(header_length, len(data), 97))
    for n in sorted(cuts):
        err = reject(data[:n], secret=SECRET)
        assert err.reason in ("truncated", "magic", "padding"), (n, str(err))


def test_appended_bytes():
    data = encode()
    reject(data + b"\0", "length")
    reject(data + data, "length")


def test_wrong_key_fingerprint_layout_tokens():
    data = encode()
    reject(data, "key", key=KEY_B)
    reject(data, "fingerprint", fingerprint="another-model")
    reject(data, "layout", layout=KVLayout(2, 2, 64, 16, "float16"))
    reject(data, "layout", layout=KVLayout(2, 1, 128, 16, "bfloat16"))  # same bytes, other shape
    reject(data, "tokens", tokens=[*TOKENS[:-1], 7])
    reject(data, "tokens", tokens=TOKENS[:-1])


def test_swapped_objects():
    # a tier that hands back A's object for B (a hash collision in a file name, a mixed-up index)
    obj_a = encode(make_kv(layout_of(), seed=1), key=KEY_A)
    obj_b = encode(make_kv(layout_of(), seed=2), key=KEY_B)
    reject(obj_a, "key", key=KEY_B)
    reject(obj_b, "key", key=KEY_A)
    # B's payload under A's header: the checksum covers header and payload together
    start = read_header(obj_a).header_length
    reject(obj_a[:start] + obj_b[start:], "checksum")


def test_checksum_catches_reordered_and_zeroed_rows():
    data = encode()
    start = read_header(data).header_length
    row = 8 * integrity.ROW_WORDS
    payload = bytearray(data[start:])
    assert len(payload) >= 3 * row
    swapped = payload[row : 2 * row] + payload[:row] + payload[2 * row :]
    reject(data[:start] + bytes(swapped), "checksum")
    for offset in (0, row - 8, row + 8):  # swap two words within a row, and across rows
        w = bytearray(payload)
        w[offset : offset + 8], w[offset + 8 : offset + 16] = (
            w[offset + 8 : offset + 16],
            w[offset : offset + 8],
        )
        reject(data[:start] + bytes(w), "checksum")
    zeroed = bytearray(payload)
    zeroed[100 : 100 + row] = bytes(row)  # a 4 KiB hole across two rows
    reject(data[:start] + bytes(zeroed), "checksum")
    # a single bit anywhere in the payload
    rng = np.random.default_rng(7)
    for i in rng.integers(start, len(data), 50):
        reject(flip(data, int(i), 1 << int(rng.integers(8))), "checksum")


def test_hmac_tampered_payload_with_valid_checksum():
    # an attacker who changes the payload can recompute the checksum, but not the HMAC
    data = encode(secret=SECRET)
    start = read_header(data).header_length
    fields_len = len(header.parse(memoryview(data)).fields)
    evil = bytearray(data)
    evil[start + 10] ^= 0x40
    evil[fields_len : fields_len + 16] = integrity.checksum(evil[:fields_len], memoryview(evil)[start:])
    reject(bytes(evil), "hmac", secret=SECRET)
    reject(bytes(evil), "hmac")  # without a secret an HMAC-carrying object is refused anyway
    plain = encode()
    reject(flip(plain, read_header(plain).header_length + 10, 0x40), "checksum")


def test_hmac_required_refused_and_wrong():
    plain = encode()
    signed = encode(secret=SECRET)
    err = reject(plain, "hmac", secret=SECRET)
    assert "no HMAC" in str(err)
    err = reject(signed, "hmac")
    assert "no secret" in str(err) and "KVTIER_CACHE_SECRET" in str(err)
    reject(signed, "hmac", secret=b"another secret")
    reject(encode(secret=b"attacker"), "hmac", secret=SECRET)


def test_huge_length_fields_do_not_allocate():
    layout = layout_of()
    good = encode()
    h = read_header(good)
    key_at = 8
    fp_at = key_at + 2 + len(KEY_A)
    layout_at = fp_at + 2 + len(FP.encode())
    tokens_at = layout_at + 2 + len(layout.to_bytes())
    trailer_at = tokens_at + 4 + 4 * len(TOKENS)

    def patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
        b = bytearray(data)
        struct.pack_into(fmt, b, at, value)
        return bytes(b)

    cases = {
        "key": patch(good, key_at, "<H", 0xFFFF),
        "fingerprint": patch(good, fp_at, "<H", 0xFFFF),
        "layout": patch(good, layout_at, "<H", 0xFFFF),
        "tokens": patch(good, tokens_at, "<I", 0xFFFFFFFF),
        "payload": patch(good, trailer_at + 2, "<Q", 2**64 - 1),
        "raw": patch(good, trailer_at + 10, "<Q", 2**64 - 1),
        "dims": patch(good, layout_at + 2, "<I", 0xFFFFFFFF),
    }
    tracemalloc.start()
    try:
        for name, data in cases.items():
            with pytest.raises(CorruptObjectError):
                decode(data)
            if name not in ("payload", "raw", "dims"):
                with pytest.raises(CorruptObjectError):
                    read_header(data)
        # the same lengths where the checksum is valid: a length check refuses them, not an allocation
        with pytest.raises(CorruptObjectError, match="length"):
            decode(forge(layout, good[h.header_length :], raw_length=2**63))
        with pytest.raises(CorruptObjectError, match="raw length"):
            decode(forge(layout, b"x" * 64, comp="zstd", raw_length=2**62))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(good) + (1 << 20), peak


def test_decompression_bombs_are_refused():
    layout = layout_of()
    raw = read_header(encode()).raw_length
    # zstd frames claiming 2**40 bytes, or no size at all, or cut short: refused, nothing allocated
    cobj = zstandard.ZstdCompressor().compressobj(size=2**40)
    huge = cobj.compress(bytes(1000)) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert zstandard.frame_content_size(huge) == 2**40
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 24))
    cut = zstandard.ZstdCompressor().compress(bytes(raw))[:-3]
    tracemalloc.start()
    try:
        for payload in (huge, unsized, cut):
            reject(forge(layout, payload, comp="zstd", raw_length=raw), "decompress")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    # lz4 frame that decompresses to 16x the expected size: stopped at raw_length
    big = lz4.frame.compress(bytes(16 * raw), store_size=False)
    reject(forge(layout, big, comp="lz4", raw_length=raw), "decompress")
    reject(forge(layout, lz4.frame.compress(bytes(raw - 1)), comp="lz4", raw_length=raw), "decompress")
    reject(forge(layout, b"\x04\x22\x4d\x18garbage", comp="lz4", raw_length=raw), "decompress")
    reject(forge(layout, b"not a zstd frame", comp="zstd", raw_length=raw), "decompress")
    # the uncompressed payload must be exactly the block
    reject(forge(layout, bytes(raw - 8), raw_length=raw), "length")


def test_random_garbage_only_raises_corrupt_object_error():
    rng = np.random.default_rng(1234)
    valid = [
        encode(config=CodecConfig(q, c), secret=s)
        for q, c, s in [("none", "none", None), ("int8", "zstd", SECRET), ("fp8", "lz4", None)]
    ]
    prefix = MAGIC + struct.pack("<HH", FORMAT_VERSION, 0)
    for i in range(600):
        kind = i % 4
        if kind == 0:  # pure noise
            data = rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        elif kind == 1:  # noise behind a plausible prefix
            data = prefix + rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        else:  # a valid object, mutated: random bytes changed, cut, or spliced
            base = bytearray(valid[int(rng.integers(len(valid)))])
            if kind == 2:
                for _ in range(int(rng.integers(1, 4))):
                    base[int(rng.integers(len(base)))] ^= int(rng.integers(1, 256))
            else:
                at = int(rng.integers(len(base)))
                junk = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
                base = base[:at] + junk + base[at + int(rng.integers(0, 64)) :]
            data = bytes(base)
        for secret in (None, SECRET):
            try:
                decode(data, secret=secret)
            except CorruptObjectError:
                pass
            else:
                raise AssertionError(f"garbage buffer {i} decoded")
        with contextlib.suppress(CorruptObjectError):
            assert isinstance(read_header(data), BlockHeader)


def test_codec_imports_nothing_above_cache():
    # cache <- model <- engine: the codec may import from kvtier.cache only (the package's own
    # __init__ imports the engine, so this is checked on the source, not on sys.modules)
    imported: list[str] = []
    for path in Path(codec.__file__).parent.glob("*.py"):  # every module of the codec package
        tree = ast.parse(path.read_text())
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    kvtier_imports = [m for m in imported if m.split(".")[0] == "kvtier"]
    assert kvtier_imports and all(m.startswith("kvtier.cache") for m in kvtier_imports), kvtier_imports
    for forbidden in ("pickle", "marshal", "shelve"):
        assert forbidden not in imported


@pytest.mark.parametrize("shape", [(4, 2, 16, 2, 64), (1, 2, 3, 1, 8)])  # whole rows, and a tail only
def test_checksum_from_payload_sums_matches(shape: tuple[int, ...]) -> None:
    """A reader that verifies on another device (payload_sums there, checksum_from_sums here) gets
    exactly the checksum the CPU computes; a flipped bit fails either way."""
    layout = KVLayout(shape[0], shape[3], shape[4], shape[2], "float32")
    kv = torch.randn(layout.block_shape, generator=torch.Generator().manual_seed(3))
    data = encode_block(KEY_A, FP, layout, list(range(layout.block_size)), kv)
    obj = check_object(data, key=KEY_A, fingerprint=FP, layout=layout)
    payload = torch.frombuffer(bytearray(obj.payload), dtype=torch.uint8).unsqueeze(0)
    rows, cols = payload_sums(payload)
    obj.verify_checksum((rows[0].numpy().tobytes(), cols[0].numpy().tobytes()))  # no raise
    obj.verify_checksum()
    payload[0, 5] ^= 0x20
    rows, cols = payload_sums(payload)
    bad = data[: obj.payload_offset] + bytes(payload[0].numpy())
    bad_obj = check_object(bad, key=KEY_A, fingerprint=FP, layout=layout)
    with pytest.raises(CorruptObjectError, match="checksum"):
        bad_obj.verify_checksum((rows[0].numpy().tobytes(), cols[0].numpy().tobytes()))
    with pytest.raises(CorruptObjectError, match="checksum"):
        bad_obj.verify_checksum()
