"""A Triton kernel that copies one layer of host-tier blocks into the device pool, reading the
page-locked slab directly, and computes the blocks' ``integrity_sums`` on the way.

Why: a load from the host tier that copies whole blocks must finish before the model's first layer
runs (a 4k-token prefix of an 8B model is 536 MB, ~10 ms of PCIe), so its time adds to the
model's. Copied one layer at a time on a stream of its own, with an event after each layer, the
model's layer i waits only for layer i's copy: the load runs under the compute. A block's layer
is 2 pieces of ``[block_size, heads, dim]`` (K and V) at 2 places of the pool, and the slots of
one load are scattered over the slab, so per layer that would be 2 copies a block; one launch a
layer instead reads the slab under unified addressing (page-locked memory is mapped into the
GPU's address space) at 0.92x of one contiguous DMA on the H200 (``bench/host_copy_probe.py``).

The integrity check comes with the copy: ``integrity_sums`` are the sums of each 512-word row of
a block and of each column over its rows; when a layer's K and V pieces are whole rows
(``layer_rows_align``), each program writes the sums of the rows it moved and adds its column sums
into the block's (integer adds wrap, so their order does not change the result). The sums are of
the words the kernel read and wrote, so they check what landed in the pool, as the whole-block
load's check does. Column sums are kept one row a block, not one a tile: per tile they took a
quarter of the blocks' own size on the device (134 MB for a 4k prefix of the 8B).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.cache.codec.integrity import ROW_WORDS

WORD_BYTES = 8
PROGRAM_ROWS = 4  # rows (4 KiB each) a program moves: 16 KiB, the probe's fastest grain
COPY_PROGRAMS = 16  # programs a layer's copy runs on (of the H200's 132 SMs): the probe's best beside matmuls


def layer_rows_align(piece_bytes: int) -> bool:
    """Whether a layer's K (or V) piece of a block is whole rows of ``integrity_sums`` (and so
    whole programs of the kernel): then its sums can be computed a layer at a time."""
    row_bytes = ROW_WORDS * WORD_BYTES
    return piece_bytes % row_bytes == 0 and (piece_bytes // row_bytes) % _program_rows(piece_bytes) == 0


def _program_rows(piece_bytes: int) -> int:
    return min(PROGRAM_ROWS, max(1, piece_bytes // (ROW_WORDS * WORD_BYTES)))


@triton.jit(do_not_specialize=["num_pool_blocks", "layer", "tiles"])  # one compile for every load
def _gather_layer_kernel(
    src_rows,  # [n] int64: the address of each block's slot in the slab
    dst,  # the pool as int64 words: [L, 2, num_pool_blocks, PIECE_WORDS]
    dst_blocks,  # [n] int64: each block's id in the pool
    row_sums,  # [n, ROWS_PER_BLOCK] int64
    col_sums,  # [n, ROW] int64, zeroed before the first layer
    num_pool_blocks,
    layer,
    tiles,  # n * tiles a block's layer
    PIECE_WORDS: tl.constexpr,
    ROWS_PER_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    ROW: tl.constexpr,
):
    """A few programs, each looping over tiles: ROWS rows of block j's K (half 0) or V (half 1)
    piece of ``layer``. Few, because a program waiting on host memory holds its SM: one program a
    tile filled every SM and the model's kernels waited for the copy (beside skinny matmuls the
    two took the sum of their times on the H200)."""
    parts_per_piece: tl.constexpr = PIECE_WORDS // (ROWS * ROW)
    tiles_per_block: tl.constexpr = 2 * parts_per_piece
    words = tl.arange(0, ROWS)[:, None] * ROW + tl.arange(0, ROW)[None, :]
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        j = t // tiles_per_block
        half = (t % tiles_per_block) // parts_per_piece
        part = t % parts_per_piece
        src = tl.load(src_rows + j).to(tl.pointer_type(tl.int64))
        block = tl.load(dst_blocks + j)
        piece = layer * 2 + half  # the piece's place in the block, in pieces
        at = part * ROWS * ROW + words
        values = tl.load(src + piece.to(tl.int64) * PIECE_WORDS + at)
        tl.store(dst + (piece.to(tl.int64) * num_pool_blocks + block) * PIECE_WORDS + at, values)
        first_row = piece * (PIECE_WORDS // ROW) + part * ROWS
        sums_at = j.to(tl.int64) * ROWS_PER_BLOCK + first_row + tl.arange(0, ROWS)
        tl.store(row_sums + sums_at, tl.sum(values, 1))
        cols = j.to(tl.int64) * ROW + tl.arange(0, ROW)
        tl.atomic_add(col_sums + cols, tl.sum(values, 0), sem="relaxed")  # a block's tiles: many programs


class LayerGather:
    """The buffers and launches of one layer-by-layer load of ``src_rows`` (slot addresses) into
    ``dst_blocks`` of ``pool`` (``[L, 2, num_blocks, block_size, heads, dim]``, contiguous)."""

    def __init__(
        self,
        pool: torch.Tensor,
        src_rows: torch.Tensor,
        dst_blocks: torch.Tensor,
        programs: int = COPY_PROGRAMS,
    ) -> None:
        layers, _, num_blocks = pool.shape[:3]
        piece_bytes = pool[0, 0, 0].numel() * pool.element_size()
        if not pool.is_contiguous() or not layer_rows_align(piece_bytes):
            raise ValueError(f"the pool's pieces of {piece_bytes} bytes are not whole rows of the sums")
        self.words = pool.view(torch.uint8).view(torch.int64)
        self.layers, self.num_pool_blocks = layers, num_blocks
        self.piece_words = piece_bytes // WORD_BYTES
        self.rows = _program_rows(piece_bytes)
        n = int(src_rows.shape[0])
        self.rows_per_block = 2 * layers * self.piece_words // ROW_WORDS
        self.src_rows, self.dst_blocks = src_rows, dst_blocks
        self.programs = programs  # 0: one a tile
        device = pool.device
        self.row_sums = torch.empty((n, self.rows_per_block), dtype=torch.int64, device=device)
        self.col_sums = torch.zeros((n, ROW_WORDS), dtype=torch.int64, device=device)

    def copy_layer(self, layer: int) -> None:
        """Queue layer ``layer``'s copy (and its sums) on the current stream."""
        n = int(self.src_rows.shape[0])
        if not n:
            return
        tiles = n * 2 * self.piece_words // (self.rows * ROW_WORDS)
        grid = (min(tiles, self.programs) if self.programs else tiles,)
        _gather_layer_kernel[grid](
            self.src_rows,
            self.words,
            self.dst_blocks,
            self.row_sums,
            self.col_sums,
            self.num_pool_blocks,
            layer,
            tiles,
            PIECE_WORDS=self.piece_words,
            ROWS_PER_BLOCK=self.rows_per_block,
            ROWS=self.rows,
            ROW=ROW_WORDS,
        )

    def sums(self) -> torch.Tensor:
        """``integrity_sums`` of the blocks copied (after every layer's copy): ``[n, rows + 512]``."""
        return torch.cat([self.row_sums, self.col_sums], dim=1)
