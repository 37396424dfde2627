"""Coverage-guided fuzzing (atheris, libFuzzer) of the codec decoder on untrusted tier bytes.

    PYTHONPATH=$PWD/src python tests/atheris_codec.py -max_total_time=600 [-seed=N] [CORPUS_DIR]

Every libFuzzer flag works (``-runs=N``, ``-max_len=N``, ``-jobs``...). The first input byte picks
what the rest is:

- even: a whole stored object, as a tier would return it. The seeds are real objects of every
  codec, so mutations start past the magic and the header.
- odd: an object *forged without the secret*: the header names the requested block with a
  quantization and compression drawn from the input, the payload is the rest of the input, and the
  checksum is made valid (anyone with write access to Redis can compute it). This is what reaches
  the decompressors and the dequantizer with arbitrary bytes.

Decoding must return the requested block's shape and dtype or raise ``CorruptObjectError``, and
allocate at most 4x its input plus 4 blocks plus 256 KiB (traced with tracemalloc: Python and numpy
buffers, which is where a decompressor's output lands; torch's allocator is not traced, but the
decoder asks it only for the one block it returns). Anything else
is a crash: libFuzzer prints the exception, writes the input to ``crash-<sha1>`` and exits 1.
The suite runs a short, seeded form (tests/test_reliability.py::test_atheris_finds_nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import tempfile
import tracemalloc
from pathlib import Path

import atheris
import torch

from kvtier.cache.codec import (
    CodecConfig,
    CorruptObjectError,
    block,
    compression,
    decode_block,
    encode_block,
    header,
    integrity,
    quantization,
)
from kvtier.cache.codec.header import COMPRESSIONS, QUANTIZATIONS, align, pack_fields
from kvtier.cache.keys import KVLayout, tokens_to_bytes

# The block of tests/test_reliability.py's hypothesis fuzzers (not imported: this runs standalone).
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
FP = "reliability"
KEY = hashlib.blake2b(b"r/0", digest_size=32).digest()
TOKENS = [0, 1, 2, 3]
KV = torch.arange(LAYOUT.elements_per_block, dtype=torch.float32).view(LAYOUT.block_shape)
CODECS = [CodecConfig(q, c) for q in QUANTIZATIONS for c in COMPRESSIONS]
LIMIT_EXTRA = 4 * LAYOUT.bytes_per_block + (256 << 10)


def _instrument_codec() -> None:
    """Coverage for the codec's own code only (instrumenting torch would slow every run for nothing):
    kvtier is imported already, so its functions are patched in place."""
    for module in (block, compression, header, integrity, quantization):
        for obj in list(vars(module).values()):
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if isinstance(obj, type):
                for member in vars(obj).values():
                    if hasattr(member, "__code__"):
                        atheris.instrument_func(member)
            elif hasattr(obj, "__code__"):
                atheris.instrument_func(obj)


def forge(data: bytes) -> bytes:
    """An object for (KEY, TOKENS) with a valid checksum around an arbitrary payload."""
    q = QUANTIZATIONS[data[0] % len(QUANTIZATIONS)] if data else "none"
    c = COMPRESSIONS[data[1] % len(COMPRESSIONS)] if len(data) > 1 else "none"
    raw_len = int.from_bytes(data[2:6].ljust(4, b"\0"), "little") if len(data) > 6 and data[6] & 1 else None
    payload = data[7:]
    if raw_len is None:
        raw_len = quantization.raw_length(LAYOUT, q)
    fields = pack_fields(KEY, FP, LAYOUT, tokens_to_bytes(TOKENS), q, c, len(payload), raw_len, False)
    used = len(fields) + integrity.CHECKSUM_SIZE
    return b"".join(
        [fields, integrity.checksum(fields, memoryview(payload)), bytes(align(used) - used), payload]
    )


def one_input(data: bytes) -> None:
    if not data:
        return
    obj = data[1:] if data[0] % 2 == 0 else forge(data[1:])
    # Traced from main() on: starting and stopping tracemalloc per input leaks ~700 bytes a time
    # (measured), which would read as a leak of the decoder's.
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    with contextlib.suppress(CorruptObjectError):
        kv = decode_block(obj, key=KEY, fingerprint=FP, layout=LAYOUT, tokens=TOKENS)
        if tuple(kv.shape) != LAYOUT.block_shape or kv.dtype != torch.float32:
            raise AssertionError(f"decoded {tuple(kv.shape)} {kv.dtype}")
    peak = tracemalloc.get_traced_memory()[1] - base
    if peak > 4 * len(obj) + LIMIT_EXTRA:
        raise AssertionError(f"decoding {len(obj)} bytes allocated {peak} bytes")


def seed_corpus(folder: Path) -> None:
    """Real objects of every codec, each as a whole object (b'\\0' + object)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, codec in enumerate(CODECS):
        (folder / f"seed-{i}").write_bytes(b"\0" + encode_block(KEY, FP, LAYOUT, TOKENS, KV, codec))


def main(argv: list[str]) -> None:
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if not corpus:  # a fresh corpus of seeds in a temp folder, gone afterwards
        tmp = tempfile.mkdtemp(prefix="kvtier-atheris-")
        seed_corpus(Path(tmp))
        argv = [*argv, tmp]
    else:
        seed_corpus(Path(corpus[0]))
    if not any(a.startswith("-max_len") for a in argv):
        argv = [*argv, f"-max_len={2 * LAYOUT.bytes_per_block + 4096}"]
    _instrument_codec()
    tracemalloc.start()
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
