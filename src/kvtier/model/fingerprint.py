"""Model fingerprints: a digest of everything a model's KV depends on, part of every cache key.

A checkpoint's covers its config and every byte of every weight file. Hashing 16 GB takes tens of
seconds, so each file's digest is remembered beside the checkpoint (or in the kvtier cache folder
when the checkpoint's is read-only) under the file's size, mtime, ctime and inode, and a restart
reads no weights. A synthetic model's covers what draws its weights: name, seed, config and dtype,
torch's version and the generator's device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kvtier.model.registry import ModelConfig

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: the message names the file and what is wrong."""


def synthetic_fingerprint(
    name: str, seed: int, cfg: ModelConfig, hf_config: Any, device: torch.device
) -> str:
    return _digest(
        b"synthetic", name.encode(), str(seed).encode(), _config_bytes(cfg, hf_config), _rng_identity(device)
    )


def checkpoint_fingerprint(cfg: ModelConfig, hf_config: Any, files: list[Path]) -> str:
    return _digest(b"checkpoint", _config_bytes(cfg, hf_config), weight_identity(files))


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(struct.pack("<Q", len(p)))
        h.update(p)
    return h.hexdigest()


def _config_bytes(cfg: ModelConfig, hf_config: Any) -> bytes:
    fields = {k: str(v) for k, v in asdict(cfg).items()}
    fields["rope"] = json.dumps(
        getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None),
        sort_keys=True,
        default=str,
    )
    return json.dumps(fields, sort_keys=True).encode()


DIGEST_CACHE_NAME = ".kvtier-weights-digest.json"
DIGEST_CACHE_VERSION = 1
_CHUNK = 8 << 20


def weight_identity(files: list[Path], cache_dir: str | os.PathLike[str] | None = None) -> bytes:
    """A digest of every byte of every weight file: any edit, anywhere, changes the fingerprint.

    Each file's digest is remembered (beside the checkpoint, else in ``cache_dir``) under its size,
    mtime, ctime and inode: an in-place edit changes mtime, and even one that restores mtime changes
    ctime, which no user can set. A restart reads the remembered digests and no weights.
    """
    h = hashlib.blake2b(digest_size=32)
    folder = files[0].parent if files else Path(".")
    remembered = _read_digest_cache(folder, cache_dir)
    fresh: dict[str, dict[str, Any]] = {}
    for path in files:
        st = path.stat()
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
        entry = remembered.get(path.name)
        if not (isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items())):
            entry = {**stamp, "blake2b": _file_digest(path)}
        fresh[path.name] = entry
        h.update(path.name.encode() + struct.pack("<Q", st.st_size) + bytes.fromhex(entry["blake2b"]))
    if fresh != remembered:
        _write_digest_cache(folder, cache_dir, fresh)
    return h.digest()


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as e:
        raise CheckpointError(f"cannot read the weights file {path}: {_reason(e)}") from None
    return h.hexdigest()


def _digest_cache_paths(folder: Path, cache_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Beside the checkpoint first; the kvtier cache folder (one file per checkpoint path) second."""
    from kvtier.config import default_cache_dir

    tag = hashlib.blake2b(str(folder.resolve()).encode(), digest_size=16).hexdigest()
    other = Path(cache_dir or default_cache_dir()) / "weight-digests" / f"{tag}.json"
    return [folder / DIGEST_CACHE_NAME, other]


def _read_digest_cache(folder: Path, cache_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    for path in _digest_cache_paths(folder, cache_dir):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # absent or damaged: the digests are recomputed (a damaged cache is never trusted)
        if isinstance(data, dict) and data.get("version") == DIGEST_CACHE_VERSION:
            files = data.get("files")
            if isinstance(files, dict) and all(
                isinstance(e, dict) and isinstance(e.get("blake2b"), str) and len(e["blake2b"]) == 64
                for e in files.values()
            ):
                return files
    return {}


def _write_digest_cache(
    folder: Path, cache_dir: str | os.PathLike[str] | None, files: dict[str, Any]
) -> None:
    text = json.dumps({"version": DIGEST_CACHE_VERSION, "files": files}, sort_keys=True)
    for path in _digest_cache_paths(folder, cache_dir):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new, never half
            return
        except OSError:
            tmp.unlink(missing_ok=True)
    log.warning("cannot remember the weight digests of %s: the next start re-reads the weights", folder)


def _rng_identity(device: torch.device) -> bytes:
    """What synthetic weights depend on besides name, seed and dtype: the generator that drew them.

    ``_init_synthetic_weights`` is a pure function of (name, seed, dtype, torch's RNG algorithm on
    this kind of device): CPU and CUDA generators give different numbers for one seed, and a CUDA
    kernel's draw order follows the grid it launches, which follows the device model. So the torch
    version and the device (its model name on CUDA) are part of a synthetic fingerprint, and two
    instances share synthetic KV exactly when they drew the same weights.
    """
    kind = device.type
    if kind == "cuda":
        kind += ":" + torch.cuda.get_device_name(device)
    return f"{torch.__version__}|{kind}".encode()


def _reason(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"no {e} entry"
    return str(e) or type(e).__name__
