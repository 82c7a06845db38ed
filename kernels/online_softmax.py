"""Shared Triton building blocks: the online softmax normaliser, tile loading, launch settings.

Online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax") finds
lse(x) = log Σ_j exp(x_j) of a row in ONE read of it, carrying a running max m and a running sum
d = Σ exp(x_j - m) that is rescaled whenever the max grows:
    m' = max(m, max_tile x),   d' = d·exp(m - m') + Σ_tile exp(x_j - m'),   lse = m + log d.
A 150k vocabulary does not fit one tile, so every kernel streams its row in BLOCK_V tiles, one
program per row, with int64 row offsets (N·V passes 2^31 at 16k rows of Qwen's 151936).

V is a compile-time constant (one compile per vocabulary size): it lets the compiler plan the tile
loop, and Triton's CPU interpreter needs constant loop bounds under NumPy ≥ 2.4.
Triton is optional: without it (macOS, CPU-only wheels) a stand-in lets the kernel modules import,
and the dispatcher in kernels/__init__.py never launches them.
"""
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so @triton.jit definitions still import."""
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

MAX_BLOCK_V = 4096   # fp32 tile of 16 KiB: 16 values per thread at 8 warps, no register spills


def launch_config(vocab_size: int) -> dict:
    """Tile width and warps for rows of `vocab_size` values (constexpr kwargs of every kernel)."""
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    return dict(V=vocab_size, BLOCK_V=block, num_warps=8 if block >= 2048 else 4)


def contiguous_rows(x):
    """x with unit stride along the vocabulary, as every kernel indexes row * stride + column."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def load_tile(row_ptr, cols, V: tl.constexpr, scale):
    """scale · x[cols] in fp32, -inf past the row end (exp(-inf) = 0 drops it from every sum)."""
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)   # (BLOCK_V,)
    return x * scale


@triton.jit
def log_softmax_tile(row_ptr, cols, V: tl.constexpr, scale, lse):
    """log softmax(scale · x)[cols] in fp32 given the row's lse (-inf past the row end)."""
    return load_tile(row_ptr, cols, V, scale) - lse


@triton.jit
def online_softmax_step(m, d, x):
    """Fold one tile x into (max m, sum d). Returns m', d', the rescale exp(m - m') of anything
    accumulated against the old max, and the tile's exp(x - m')."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    alpha = tl.exp(m - m_new)
    e = tl.exp(x - m_new)
    return m_new, d * alpha + tl.sum(e, axis=0), alpha, e


@triton.jit
def row_logsumexp(row_ptr, scale, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """lse(scale · x) of one row of V values in a single streamed pass."""
    cols = tl.arange(0, BLOCK_V)
    m = -3.0e38   # finite start: exp(m - m') is 0, never nan, when a row opens with -inf logits
    d = 0.0
    for start in range(0, V, BLOCK_V):
        m, d, _, _ = online_softmax_step(m, d, load_tile(row_ptr, start + cols, V, scale))
    return m + tl.log(d)
