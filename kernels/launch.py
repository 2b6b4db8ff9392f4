"""Launch helpers shared by the Triton ops: block sizes, how many programs share a loop, output buffers.

Under TRITON_INTERPRET=1 (CPU tensors) every program instance has a fixed cost whatever its size, so blocks are as large
as the data and each loop runs in one program. On a GPU, blocks are sized for registers and tl.dot (every dimension
of a dot >= 16), and a loop over tiles is split between programs until there are ~4 per streaming multiprocessor.
"""

from __future__ import annotations

import functools

import torch
import triton

# Tests set this to True: every buffer a kernel is meant to fill then starts as NaN, so an element the kernel
# failed to write shows up in the results.
POISON_BUFFERS = False

PROGRAMS_PER_SM = 4
INTERPRETER_MAX_BLOCK = 1 << 16  # elements of one block in the interpreter (numpy arrays; memory stays small)


def new_buffer(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized tensor on like's device (dtype: like's), NaN-filled when POISON_BUFFERS is set."""
    dtype = like.dtype if dtype is None else dtype
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def interpreted(device: torch.device) -> bool:
    """True where kernels run in the interpreter: Triton compiles for CUDA devices only."""
    return device.type != "cuda"


def loop_splits(n_programs_across: int, n_tiles: int, device: torch.device) -> int:
    """Programs sharing a loop over n_tiles tiles, given n_programs_across programs on the other grid axis."""
    if interpreted(device):
        return 1
    return max(1, min(n_tiles, triton.cdiv(PROGRAMS_PER_SM * _sm_count(device.index), n_programs_across)))


@functools.cache
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile(n_cells: int, n_genes: int, device: torch.device, gpu_tile: tuple[int, int], minimum: int = 1):
    """(BLOCK_CELLS, BLOCK_GENES) for a cells x genes loop: gpu_tile on a GPU; in the interpreter all the cells and
    as many genes as fit in INTERPRETER_MAX_BLOCK elements. Powers of two, each at least `minimum` (16 for tl.dot)."""
    if not interpreted(device):
        return gpu_tile
    block_cells = max(minimum, triton.next_power_of_2(n_cells))
    block_genes = min(triton.next_power_of_2(n_genes), max(1, INTERPRETER_MAX_BLOCK // block_cells))
    return block_cells, max(minimum, block_genes)
