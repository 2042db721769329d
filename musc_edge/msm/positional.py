"""Positional MSM for fixtured, aligned parts: each patch meets only the patches around its own
position in the other images (docs/positional.md).

Global MSM scores patch p of image i by `min_q |z_ip - z_jq|` over *every* patch q of each
other image j. Here q is restricted to the w x w window of grid positions centred on p's
position (clipped at the border); the rest is unchanged: the mean over the K closest other
images, K = max(1, floor(frac (N - 1))). A patch that looks like the part's texture found
elsewhere (a dark spot where this position should be bright) then scores high, and the cost
falls by about L / w^2.

How it is computed. Patches are laid out position-major, (L, N, C), positions in raster
order. For a query position p and a row offset dy, the window cells dx = -r .. r of row
y + dy are the r-padded flat positions p + dy h - r .. p + dy h + r, of every image: one
contiguous (w N, C) block of keys. So one product per query position and dy gives all w
column offsets of all images at once, the keys a strided view (no copy), batched over a range
of positions. Cells that leave the grid sideways land on the neighbouring row (or the
padding) and are masked to +inf; rows off the grid are skipped.

- **Symmetric** (every image a query, the default batch mode): only half of the offsets
  (dy > 0, or dy = 0 and dx >= 0). Each product also gives the key image's entry at the
  mirrored offset, collected by key position (always later in raster order) and transposed
  once per chunk of positions.
- **Banded** (queries followed by references, or a symmetric chunk too large): chunks of
  query images and positions against every image, all w^2 offsets.

Chunks are sized so that their tables, top-K and product blocks fit the memory budget, as
the global planner (`plan.py`) sizes its bands; like the input there, the operands (the
input in the kernel's layout) come on top.

Products are costs, lower is closer: negated similarities in fp32; in fp16 / bf16 half
squared distances of the rounded vectors in the tiles backend's exact distance form
(`tiles.distance_operands`), accumulated in fp32 by the matmul and reduced through their
int16 bit patterns. Tables hold costs in the products' dtype (a minimum picks one of its
inputs: exact in any dtype) and are turned into fp32 similarities for `finish.band_scores`,
the finishing step every MSM backend shares.
"""

from __future__ import annotations

import math

import torch

from musc_edge.errors import UsageError
from musc_edge.msm import finish
from musc_edge.msm.backends import warn_cpu_fp16
from musc_edge.msm.plan import FLOAT32_BYTES, INDEX_BYTES, neighbour_count
from musc_edge.msm.tiles import distance_operands, smallest_distance


class PositionalError(UsageError):
    """A window or a pooled set that positional MSM cannot use."""


def is_window(value: object) -> bool:
    """Whether `value` is a window side: an odd int >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value % 2 == 1


def check_window(window: object) -> int:
    """An odd window side >= 1, or a PositionalError."""
    if not is_window(window):
        raise PositionalError(f"window must be an odd integer >= 1 (3, 5, 7, ...), got {window!r}")
    return window


def grid_of(num_patches: int) -> int:
    """Side h of the square patch grid, or a PositionalError naming the likely cause."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise PositionalError(
            f"positional MSM needs the patches of a square grid, got L = {num_patches}: a class "
            "or register token left in? pass (N, h*h, C) patch vectors"
        )
    return side


def products(queries: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (P, R, K) = products of (P, R, C') queries with (P, K, C') keys, per position.

    fp32 goes to MKL as one batch, reading the overlapping key view in place; oneDNN would
    copy that view (w times the keys) for fp16 / bf16 on a CPU, so there each position is one
    plain product of contiguous operands (measured ~1.5x faster than the batch). `out` is
    reused from call to call (a fresh block each time measured ~20% slower in fp32).
    """
    if queries.dtype == torch.float32:  # -<a, b>: the GEMM negates, queries are the keys
        return torch.baddbmm(out, queries, keys.transpose(1, 2), beta=0, alpha=-1, out=out)
    if queries.device.type != "cpu":
        return torch.bmm(queries, keys.transpose(1, 2), out=out)
    for position in range(queries.shape[0]):
        torch.mm(queries[position], keys[position].T, out=out[position])
    return out


def lower(table: torch.Tensor, costs: torch.Tensor) -> None:
    """table = min(table, costs), in place."""
    torch.minimum(table, costs, out=table)


class Grids:
    """The operands in the kernel's layout, and how their products become costs.

    queries (L, N, C'), keys (L + 2 r, N, C') with r padding positions at each end (in fp32
    the queries are the keys' inner positions). A query-key product is a cost: -<a, b> in
    fp32, |a' - b'|^2 / 2 in half precision; the
    similarity of unit vectors at that cost is `offset` - cost. Costs are symmetric: the
    product of query a with key b equals that of query b with key a.
    """

    def __init__(self, z: torch.Tensor, dtype: torch.dtype, radius: int) -> None:
        num_images, num_patches, _ = z.shape
        self.side, self.radius, self.num_images = grid_of(num_patches), radius, num_images
        if dtype == torch.float32:
            queries = keys = z.float().transpose(0, 1)  # one copy: the products negate
            self.offset, self.smallest = 0.0, lambda block, dim: block.amin(dim=dim)
        else:
            # per-vector operands: built on the position-major view, they come out (L, N, C')
            queries, keys = distance_operands(z.transpose(0, 1), dtype)
            self.offset, self.smallest = 1.0, smallest_distance
        width = queries.shape[2]
        self.keys = queries.new_empty(num_patches + 2 * radius, num_images, width)
        self.keys[:radius].zero_()  # padding is masked, zeros keep it finite
        self.keys[radius + num_patches :].zero_()
        self.keys[radius : radius + num_patches] = keys
        same = queries is keys
        self.queries = self.keys[radius : radius + num_patches] if same else queries
        self.item = self.queries.element_size()
        self.buffer = self.queries.new_empty(0)

    def block_buffer(self, size: int) -> torch.Tensor:
        """`size` elements of the product block, reused by every call (grown when needed)."""
        if self.buffer.numel() < size:
            self.buffer = self.queries.new_empty(size)
        return self.buffer[:size]

    def costs(
        self, queries: torch.Tensor, start: int, dy: int, first: int, columns: int
    ) -> torch.Tensor:
        """(P, R, columns, N) costs of the (P, R, C') queries at positions start .. start +
        P - 1 against every image's window cells (dy, first + c), c < columns; cells off the
        grid +inf. Rows y + dy must be on the grid."""
        count, side = queries.shape[0], self.side
        base = self.keys[start + dy * side + first + self.radius :]
        shape = (count, columns * self.num_images, base.shape[2])
        keys = base.as_strided(shape, (base.stride(0), base.stride(1), 1))  # overlapping rows
        out = self.block_buffer(count * queries.shape[1] * shape[1])
        block = products(queries, keys, out.view(count, queries.shape[1], shape[1]))
        block = block.view(count, queries.shape[1], columns, -1)
        # cells off the grid sideways: only near the left and right edges; the positions of
        # one grid column are every h-th row of the block, a strided view
        for x in [*range(min(side, -first)), *range(max(0, side - first - columns + 1), side)]:
            low, high = -first - x, side - first - x  # cells c with low <= c < high are on it
            column = block[(x - start) % side :: side]
            if low > 0:
                column[:, :, :low] = math.inf
            if high < columns:
                column[:, :, high:] = math.inf
        return block

    def row_range(self, start: int, stop: int, dy: int) -> tuple[int, int]:
        """The positions of [start, stop) whose row y + dy is on the grid."""
        side = self.side
        return max(start, -dy * side), min(stop, side * side - dy * side)


def fill_banded(grids: Grids, table: torch.Tensor, start: int, images: slice) -> None:
    """table (P, R, N): least cost of query images `images` at positions start .. start + P
    - 1 against every image, over every cell of the window."""
    radius = grids.radius
    table.fill_(math.inf)
    stop = start + table.shape[0]
    for dy in range(-radius, radius + 1):
        lo, hi = grids.row_range(start, stop, dy)
        if lo >= hi:
            continue
        block = grids.costs(grids.queries[lo:hi, images], lo, dy, -radius, 2 * radius + 1)
        lower(table[lo - start : hi - start], grids.smallest(block, 2))


def finish_chunk(grids: Grids, table: torch.Tensor, first_image: int, keep: int) -> torch.Tensor:
    """(P, R, N) least costs of R query images from `first_image` -> (R, P) patch scores.
    An fp32 table is overwritten; a half-precision one is read into an fp32 copy."""
    rows = table.shape[1]
    similarity = table.float().neg_().add_(grids.offset)  # a copy for half-precision costs
    own = torch.arange(rows, device=table.device)
    similarity[:, own, own + first_image] = -math.inf  # an image does not vote for itself
    return finish.band_scores(similarity.permute(1, 2, 0), keep)


def score_banded(
    grids: Grids, keep: int, budget: int, num_queries: int, scores: torch.Tensor
) -> None:
    """Chunks of query images and positions against every image, every offset."""
    num_patches, num_images = grids.side**2, grids.num_images
    window = 2 * grids.radius + 1
    # per query image and position: the table and its fp32 similarities, the top-K, the
    # product block and its reduction
    per_cell = num_images * (grids.item + FLOAT32_BYTES) + keep * (FLOAT32_BYTES + INDEX_BYTES)
    per_cell += num_images * (window + 1) * grids.item
    rows = max(1, min(num_queries, budget // (num_patches * per_cell)))
    positions = max(1, min(num_patches, budget // (rows * per_cell)))
    storage = grids.queries.new_empty(positions * rows * num_images)
    for first in range(0, num_queries, rows):
        last = min(first + rows, num_queries)
        for start in range(0, num_patches, positions):
            stop = min(start + positions, num_patches)
            table = storage[: (stop - start) * (last - first) * num_images]
            table = table.view(stop - start, last - first, num_images)
            fill_banded(grids, table, start, slice(first, last))
            scores[first:last, start:stop] = finish_chunk(grids, table, first, keep)


def score_symmetric(grids: Grids, keep: int, budget: int, scores: torch.Tensor) -> bool:
    """Every image a query: half the offsets, each product serving both images, chunks of
    positions sized to the budget. False (nothing done) when one position does not fit."""
    side, radius, num_images = grids.side, grids.radius, grids.num_images
    num_patches = side * side
    window = 2 * radius + 1
    reach = radius * side + radius  # the farthest key position after a query's
    square = num_images * num_images * grids.item  # one position's table
    # per position: its table, its mirrored entries, fp32 similarities, the top-K, the product
    # block and its reduction
    per_position = 2 * square + num_images * num_images * FLOAT32_BYTES
    per_position += num_images * keep * (FLOAT32_BYTES + INDEX_BYTES)
    per_position += (window + 1) * square
    free = budget - 2 * reach * square  # the entries carried to the next chunk, and their copy
    positions = min(num_patches, free // per_position) if free > 0 else 0
    if positions < 1:
        return False
    rows = grids.queries.new_empty(positions, num_images, num_images)
    # costs collected by key position: [key image, query image], this chunk and `reach` after
    mirrored = grids.queries.new_full((positions + reach, num_images, num_images), math.inf)
    for start in range(0, num_patches, positions):
        stop = min(start + positions, num_patches)
        table = rows[: stop - start]
        table.fill_(math.inf)
        for dy in range(radius + 1):
            lo, hi = grids.row_range(start, stop, dy)
            if lo >= hi:
                continue
            first, columns = (-radius, window) if dy else (0, radius + 1)
            block = grids.costs(grids.queries[lo:hi], lo, dy, first, columns)
            lower(table[lo - start : hi - start], grids.smallest(block, 2))
            for c in range(columns):
                shift = dy * side + first + c
                end = min(hi + shift, num_patches)
                if shift == 0 or lo + shift >= end:
                    continue
                lower(mirrored[lo + shift - start : end - start], block[: end - lo - shift, :, c])
        count = stop - start
        lower(table, mirrored[:count].transpose(1, 2))
        scores[:, start:stop] = finish_chunk(grids, table, 0, keep)
        carried = mirrored[count : count + reach].clone()
        mirrored.fill_(math.inf)
        mirrored[: carried.shape[0]] = carried
    return True


def positional_scores(
    z: torch.Tensor,
    window: int,
    frac: float = 0.3,
    budget_bytes: int = 256 * 2**20,
    dtype: torch.dtype = torch.float32,
    num_queries: int | None = None,
) -> torch.Tensor:
    """(N, L, C) unit vectors on an h x h grid -> (num_queries, L) positional MSM scores.

    Patch p of query image i scores the mean over the K = max(1, floor(frac (N - 1))) closest
    other images j of `min_q |z_ip - z_jq|`, q over the `window` x `window` grid positions
    around p's (clipped at the border). Images after the first `num_queries` vote but are not
    scored. A window of 2 h - 1 or more covers the whole grid from every position: global MSM.
    """
    window = check_window(window)
    num_images, num_patches, _ = z.shape
    side = grid_of(num_patches)
    queries = num_images if num_queries is None else num_queries
    if not 0 <= queries <= num_images:
        raise PositionalError(f"num_queries must be in [0, {num_images}], got {queries}")
    scores = torch.zeros(queries, num_patches, device=z.device)
    if num_images == 1 or queries == 0:
        return scores
    if warn_cpu_fp16(dtype, z.device):
        dtype = torch.float32
    radius = min(window // 2, side - 1)  # a wider window adds no position
    keep = neighbour_count(num_images, frac)
    grids = Grids(z, dtype, radius)
    if queries == num_images and score_symmetric(grids, keep, budget_bytes, scores):
        return scores
    score_banded(grids, keep, budget_bytes, queries, scores)
    return scores
