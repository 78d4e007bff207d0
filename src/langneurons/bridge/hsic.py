r"""HSIC between neuron activations, as used by BridgeX-ICL to score bridge languages.

Setting (METHODS.md, section 6).  For a language pair (s, t), a candidate bridge
language b and one layer l:

* ``X`` -- activations of the s-t overlap neurons, shape ``[n1, N]``
  (one row per neuron, one column per probe);
* ``Y`` -- activations of b's language neurons, shape ``[n2, N]``.

Pipeline implemented by :func:`hsic_matrix`:

1. :func:`zscore_rows` standardises every neuron row over its ``N`` probes
   (a constant row becomes all zeros instead of NaN).
2. :func:`median_bandwidth` picks one shared bandwidth ``sigma`` for the layer: the
   median Euclidean distance between the (z-scored) rows of ``X`` and ``Y`` pooled
   together.  An explicit ``sigma`` may be passed instead.
3. :func:`gaussian_kernels` turns every neuron row ``x`` (a length-``N`` vector) into an
   ``N x N`` Gaussian Gram matrix over the probes,
   ``K[a, b] = exp(-(x_a - x_b)^2 / (2 sigma^2))``.
4. Every pair (i, j) of an X neuron and a Y neuron gets an HSIC value between ``K_i``
   and ``L_j``; the result is the matrix ``HSIC[i, j]`` of shape ``[n1, n2]``.
5. :func:`layer_score` reduces the matrix to one number per layer,
   ``1/2 (mean_i max_j HSIC_ij + mean_j max_i HSIC_ij)``.

Estimators (``variant``), with ``H = I - 1 1^T / N`` the centring matrix:

``"biased"`` (default)
    Textbook biased estimator (Gretton et al. 2005):
    ``HSIC_b(K, L) = tr(K H L H) / (N - 1)^2``.  Non-negative for the PSD Gaussian
    kernels used here (up to rounding).  Needs ``N >= 2``.
``"unbiased"``
    Song et al. (2012) unbiased estimator on kernels with zeroed diagonals
    ``K~``, ``L~``::

        HSIC_u = [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((N-1)(N-2))
                   - 2/(N-2) 1^T K~ L~ 1 ] / (N (N-3))

    Its expectation is 0 for independent rows; single values can be negative.
    Needs ``N >= 4``.
``"normalized"``
    CKA-style ``HSIC_b(K, L) / sqrt(HSIC_b(K, K) HSIC_b(L, L))`` with the biased
    estimator, in ``[0, 1]``.  When the denominator is 0 (a constant row, whose kernel
    is the all-ones matrix and centres to 0) the value is defined as 0.
``"paper"``
    The score as published in BridgeX-ICL, ``tr(K_i H L_j)``: only one centring
    matrix, no ``(N-1)^2`` normalisation.  It can be negative.  Needs ``N >= 1``.

Vectorisation.  Every variant is an inner product of two ``N x N`` matrices,
``HSIC_ij = c * <A_i, B_j>_F = c * sum_ab A_i[a, b] B_j[a, b]``, where ``A_i`` is ``K_i``
centred once (``H K_i H`` built from row/column/grand means, never from explicit
``H`` products), ``B_j`` is ``L_j - 1`` (``H L_j H`` for ``normalized``) and ``c`` is a
constant.  Flattening the kernels turns the whole matrix into matrix products
``[n1, P] @ [P, n2]`` over the kernel entries: ``O(n1 n2 N^2)`` work and no per-pair
Python loop.  Only the entries on and above the diagonal are formed (the matrices are
symmetric), in bands of a few kernel rows that stay in cache, and neurons are taken
``chunk`` at a time, so memory stays bounded.  All arithmetic is float64.
:func:`hsic_pair_loop` is the slow, direct per-pair reference.

Note on the bandwidth.  With z-scored rows the median row distance is about
``sqrt(2 N)`` for unrelated neurons, while the kernel is applied to scalar
differences ``x_a - x_b`` that are of order 1.  The kernels are then close to
``1 - (x_a - x_b)^2 / (2 sigma^2)``, i.e. HSIC behaves almost like a (squared)
linear-covariance measure and the biased/unbiased values are tiny (about 1e-6 at
``N = 256``).  This follows the method description; pass ``sigma`` explicitly for a
more local kernel.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

__all__ = [
    "VARIANTS",
    "zscore_rows",
    "median_bandwidth",
    "gaussian_kernels",
    "hsic_matrix",
    "layer_score",
    "hsic_pair_loop",
]

#: Names accepted by the ``variant`` argument of :func:`hsic_matrix` and
#: :func:`hsic_pair_loop`.
VARIANTS = ("biased", "unbiased", "normalized", "paper")

#: Smallest number of probes each variant needs.
_MIN_PROBES = {"biased": 2, "unbiased": 4, "normalized": 2, "paper": 1}

#: A row counts as constant when its standard deviation is at most this fraction of
#: its largest absolute value (float64 rounding noise is around 1e-16 of that).
_CONSTANT_RTOL = 1e-10

#: Target number of float64 values in one kernel band of one side (2 MiB), small enough
#: to stay in a CPU cache between building the band and multiplying it.
_BAND_ELEMENTS = 1 << 18


# --------------------------------------------------------------------------- helpers


def _as_matrix(a, name: str) -> torch.Tensor:
    """Return ``a`` (torch tensor, numpy array or nested list) as a float64 2-D tensor.

    Raises ``ValueError`` if it is not 2-D or holds NaN/inf values.
    """
    if isinstance(a, np.ndarray):
        t = torch.from_numpy(np.asarray(a, dtype=np.float64))
    else:
        t = torch.as_tensor(a)
    t = t.to(torch.float64)
    if t.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [neurons, probes]; got shape {tuple(t.shape)}"
        )
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _check_variant(variant: str, n_probes: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown HSIC variant {variant!r}; choose one of {VARIANTS}")
    need = _MIN_PROBES[variant]
    if n_probes < need:
        raise ValueError(
            f"HSIC variant {variant!r} needs at least {need} probes (columns); got {n_probes}"
        )


def _check_sigma(sigma: float) -> float:
    s = float(sigma)
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"sigma must be a finite positive number; got {sigma!r}")
    return s


def _blocks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` items each."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ------------------------------------------------------------------------ public API


def zscore_rows(x) -> torch.Tensor:
    r"""Standardise every row of ``x`` over its columns.

    ``z[i, a] = (x[i, a] - m_i) / s_i`` with ``m_i = mean_a x[i, a]`` and the population
    standard deviation ``s_i = sqrt(mean_a (x[i, a] - m_i)^2)`` (``ddof = 0``), so every
    non-constant output row has mean 0 and squared Euclidean norm ``N``.

    A constant row (``s_i <= 1e-10 * max_a |x[i, a]|``, which also covers rows that are
    constant up to float rounding, and all-zero rows) has no defined z-score; its
    output row is all zeros rather than NaN.  Downstream, such a neuron gets the
    all-ones kernel ``J``, which centres to 0, so it carries no dependence: HSIC 0 for
    every variant (also ``paper``, as ``tr(J H L) = 1^T H L 1 = 0``).

    Args:
        x: ``[n, N]`` activations (rows = neurons, columns = probes); torch or numpy.

    Returns:
        ``[n, N]`` float64 tensor.
    """
    x = _as_matrix(x, "x")
    if x.shape[1] == 0:
        return x.clone()
    mean = x.mean(dim=1, keepdim=True)
    centred = x - mean
    std = centred.square().mean(dim=1, keepdim=True).sqrt()
    scale = x.abs().amax(dim=1, keepdim=True)
    constant = std <= _CONSTANT_RTOL * scale  # true for all-zero rows too (0 <= 0)
    safe_std = torch.where(constant, torch.ones_like(std), std)
    return torch.where(constant, torch.zeros_like(centred), centred / safe_std)


def median_bandwidth(x, y) -> float:
    r"""Shared Gaussian bandwidth: median distance between the pooled rows of X and Y.

    Let ``R = [x; y]`` be the ``n1 + n2`` rows of ``x`` and ``y`` stacked.  The pairs
    used are all unordered pairs of *distinct row positions* ``{p, q}``, ``p < q``, of
    ``R``: X-X, Y-Y and X-Y pairs alike, ``(n1 + n2)(n1 + n2 - 1) / 2`` of them, each
    once, and no row with itself.  Rows are compared as length-``N`` vectors:
    ``d_pq = ||R_p - R_q||_2``.  The result is the ordinary median of these distances
    (the mean of the two middle values when their number is even).  Pass z-scored rows
    (:func:`zscore_rows`) to follow the method; this function does not standardise.

    Degenerate cases: if the median is 0 (at least half of the pairs are coincident
    rows, e.g. many constant rows, which z-score to all zeros) the median of the
    non-zero distances is used; if every distance is 0 the result is 1.0.  Either way
    the returned bandwidth is strictly positive.

    Cost: ``O((n1 + n2)^2 N)`` time; memory ``O((n1 + n2)^2)`` for the pair distances
    (computed in row blocks, never as a full square matrix).

    Args:
        x: ``[n1, N]`` rows.
        y: ``[n2, N]`` rows (same ``N``).

    Returns:
        ``sigma`` as a Python float.

    Raises:
        ValueError: if fewer than two rows are pooled, or the column counts differ.
    """
    x = _as_matrix(x, "x")
    y = _as_matrix(y, "y").to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y need the same number of probes (columns); got {x.shape[1]} and {y.shape[1]}"
        )
    pooled = torch.cat([x, y], dim=0)
    n = pooled.shape[0]
    if n < 2:
        raise ValueError("median_bandwidth needs at least two rows in x and y together")
    parts = []
    for blk in _blocks(n, 512):
        # rows p in blk against rows q >= blk.start; keep q > p.  Exact differences
        # (no ||a||^2 + ||b||^2 - 2ab cancellation, so coincident rows give exactly 0).
        dist = torch.cdist(
            pooled[blk], pooled[blk.start :], compute_mode="donot_use_mm_for_euclid_dist"
        )
        iu = torch.triu_indices(dist.shape[0], dist.shape[1], offset=1, device=dist.device)
        parts.append(dist[iu[0], iu[1]].cpu())
    d = torch.cat(parts).numpy()
    sigma = float(np.median(d))
    if sigma > 0.0:
        return sigma
    positive = d[d > 0.0]
    return float(np.median(positive)) if positive.size else 1.0


def gaussian_kernels(x, sigma: float) -> torch.Tensor:
    r"""One Gaussian Gram matrix over the probes per neuron row.

    For row ``x_i`` (length ``N``):
    ``K[i, a, b] = exp(-(x_i[a] - x_i[b])^2 / (2 sigma^2))``.  Each ``K[i]`` is symmetric,
    positive semi-definite and has ones on its diagonal.

    Args:
        x: ``[n, N]`` rows (usually z-scored).
        sigma: bandwidth, finite and > 0.

    Returns:
        ``[n, N, N]`` float64 tensor (``n * N^2 * 8`` bytes).
    """
    x = _as_matrix(x, "x")
    sigma = _check_sigma(sigma)
    k = x.unsqueeze(2) - x.unsqueeze(1)  # [n, N, N] differences x_a - x_b
    k.square_().mul_(-0.5 / (sigma * sigma)).exp_()
    return k


def _row_blocks(n_probes: int, rows: int) -> Iterator[tuple[int, int]]:
    """Row ranges ``[a0, a1)`` of at most ``rows`` kernel rows covering ``range(N)``."""
    for a0 in range(0, n_probes, rows):
        yield a0, min(a0 + rows, n_probes)


def _kernel_block(z: torch.Tensor, a0: int, a1: int, sigma: float, buf: torch.Tensor) -> torch.Tensor:
    """Upper band of the Gaussian kernels: ``K[:, a0:a1, a0:]``, written into ``buf``.

    Returns the ``[n, a1 - a0, N - a0]`` view ``exp(-(z[:, a] - z[:, b])^2 / (2 sigma^2))``
    for rows ``a0 <= a < a1`` and columns ``b >= a0``.  Its first ``a1 - a0`` columns are
    the symmetric diagonal square of the block, the remaining ones lie strictly above
    the diagonal; together the bands of all row ranges cover each unordered probe pair
    ``{a, b}`` exactly once.  Writing into a preallocated buffer avoids fresh page faults
    for every block.
    """
    n, n_probes = z.shape
    r, w = a1 - a0, n_probes - a0
    kb = buf[: n * r * w].view(n, r, w)
    torch.sub(z[:, a0:a1, None], z[:, None, a0:], out=kb)
    return kb.square_().mul_(-0.5 / (sigma * sigma)).exp_()


def _kernel_row_sums(z: torch.Tensor, sigma: float, rows: int, chunk: int) -> torch.Tensor:
    """Row sums ``s[i, a] = sum_b K_i[a, b]`` of every neuron's Gaussian kernel, ``[n, N]``.

    Built from the upper bands only: a band adds its row sums to rows ``a0:a1`` and,
    by symmetry, its strictly-upper column sums to rows ``a1:``.
    """
    n, n_probes = z.shape
    sums = torch.zeros(n, n_probes, dtype=torch.float64, device=z.device)
    buf = torch.empty(min(chunk, n) * rows * n_probes, dtype=torch.float64, device=z.device)
    for cs in _blocks(n, chunk):
        for a0, a1 in _row_blocks(n_probes, rows):
            kb = _kernel_block(z[cs], a0, a1, sigma, buf)
            sums[cs, a0:a1] += kb.sum(dim=2)
            sums[cs, a1:] += kb[:, :, a1 - a0 :].sum(dim=1)
    return sums


def _centre_band(kb: torch.Tensor, sums: torch.Tensor, a0: int, a1: int, mode: str) -> torch.Tensor:
    r"""Turn a kernel band (in place) into the matching band of the matrix ``A``.

    ``sums`` are the full kernel row sums of the same neurons (``[n, N]``), ``m = sums/N``
    the row means (= column means, the kernels being symmetric), ``g`` the grand mean.

    * ``"biased"`` (also used for ``normalized``): ``A = H K H``,
      ``A[a, b] = K[a, b] - m_a - m_b + g``.
    * ``"paper"``: the symmetric part of ``K H``, ``A[a, b] = K[a, b] - (m_a + m_b) / 2``;
      since ``L`` is symmetric, ``<A, L> = <K H, L> = tr(K H L)``.
    * ``"unbiased"``: U-centred zero-diagonal kernel.  With ``K~`` = K with zeroed
      diagonal, ``r = K~ 1 = sums - 1`` and ``T = 1^T K~ 1``:
      ``A[a, b] = K[a, b] - r_a/(N-2) - r_b/(N-2) + T/((N-1)(N-2))`` for ``a != b`` and
      ``A[a, a] = 0``, so that
      ``<A, L~> = tr(K~ L~) - 2/(N-2) 1^T K~ L~ 1 + (1^T K~ 1)(1^T L~ 1)/((N-1)(N-2))``.

    All three ``A`` are orthogonal to the all-ones matrix (zero total sum; for the
    unbiased one also zero off-diagonal row sums), which lets the caller pair them with
    ``L - 1`` instead of ``L`` (better rounding, identical value).
    """
    n_probes = sums.shape[1]
    if mode == "biased":
        m = sums / n_probes
        g = m.mean(dim=1)
        kb.sub_(m[:, a0:a1, None]).sub_(m[:, None, a0:]).add_(g[:, None, None])
    elif mode == "paper":
        half = sums / (2 * n_probes)
        kb.sub_(half[:, a0:a1, None]).sub_(half[:, None, a0:])
    else:  # unbiased
        r = (sums - 1.0) / (n_probes - 2)
        t = r.sum(dim=1) / (n_probes - 1)  # = T / ((N-1)(N-2))
        kb.sub_(r[:, a0:a1, None]).sub_(r[:, None, a0:]).add_(t[:, None, None])
        kb[:, :, : a1 - a0].diagonal(dim1=1, dim2=2).zero_()
    return kb


def _band_sq_norm(band: torch.Tensor, r: int) -> torch.Tensor:
    """Contribution of one band of a symmetric matrix to its squared Frobenius norm."""
    return band[:, :, :r].square().sum(dim=(1, 2)) + 2.0 * band[:, :, r:].square().sum(dim=(1, 2))


def hsic_matrix(
    x,
    y,
    variant: str = "biased",
    sigma: float | None = None,
    *,
    standardize: bool = True,
    chunk: int = 128,
) -> torch.Tensor:
    r"""HSIC between every X neuron and every Y neuron of one layer, vectorised.

    Steps: z-score the rows (if ``standardize``), ``sigma = median_bandwidth(zx, zy)``
    unless given, Gaussian kernels ``K_i`` (``i < n1``) and ``L_j`` (``j < n2``) of size
    ``N x N`` (see :func:`gaussian_kernels`), then for every pair

    * ``"biased"``:     ``HSIC_ij = tr(K_i H L_j H) / (N-1)^2``
    * ``"unbiased"``:   Song et al. (2012) estimator (see the module docstring)
    * ``"normalized"``: ``HSIC_b(K_i, L_j) / sqrt(HSIC_b(K_i, K_i) HSIC_b(L_j, L_j))``,
      0 where the denominator is 0, clipped to ``[0, 1]`` against rounding
    * ``"paper"``:      ``HSIC_ij = tr(K_i H L_j)``

    with ``H = I - 1 1^T / N``.

    How it is computed.  Each value is ``c * <A_i, B_j>_F = c * sum_ab A_i[a,b] B_j[a,b]``.
    ``A_i`` is ``K_i`` centred once (``H K H`` as K minus row means minus column means
    plus grand mean, never with explicit ``H`` products; see ``_centre_band`` for the
    other variants), ``B_j = L_j - 1`` (``H L_j H`` for ``normalized``) and ``c`` is
    ``1/(N-1)^2``, ``1/(N(N-3))`` or 1.  All pairs come from matrix products
    ``[n1, P] @ [P, n2]`` over the flattened kernel entries, so the cost is
    ``O(n1 n2 N^2)`` with no per-pair Python loop.  Two refinements keep it fast:

    * symmetry: the kernels and every ``A_i`` are symmetric, so only the entries on and
      above the diagonal are formed, the strictly-upper ones weighted by 2 (halves the
      work);
    * blocking: the probe rows are processed in bands of a few rows so that the
      kernel blocks of both sides stay in cache (about 2 MiB each) and go straight into
      the product; the row means needed for centring come from a first, cheaper pass.

    Memory is ``O(chunk * rows * N)`` for the blocks plus ``O((n1 + n2) N)``, never a
    full ``[n, N, N]`` stack.  Everything is float64.

    Args:
        x: ``[n1, N]`` activations of the overlap neurons (torch or numpy).
        y: ``[n2, N]`` activations of the candidate bridge's neurons.
        variant: one of :data:`VARIANTS`.
        sigma: kernel bandwidth; ``None`` means :func:`median_bandwidth` of the
            (standardised) rows.
        standardize: z-score each row first (:func:`zscore_rows`); on by default as
            the method requires.
        chunk: most neurons per side processed together (bounds memory).  When
            ``n1 > chunk`` or ``n2 > chunk`` the neuron blocks are paired up one by one.

    Returns:
        ``[n1, n2]`` float64 tensor on ``x``'s device.  If ``n1`` or ``n2`` is 0 the
        result is an empty ``[n1, n2]`` tensor (no bandwidth is computed); note that
        :func:`layer_score` refuses an empty matrix.

    Raises:
        ValueError: unknown variant, too few probes for the variant, mismatched probe
            counts, non-finite input, a non-positive ``sigma`` or ``chunk``.
    """
    x = _as_matrix(x, "x")
    y = _as_matrix(y, "y").to(x.device)
    n1, n_probes = x.shape
    n2 = y.shape[0]
    if y.shape[1] != n_probes:
        raise ValueError(
            f"x and y need the same number of probes (columns); got {n_probes} and {y.shape[1]}"
        )
    _check_variant(variant, n_probes)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")
    chunk = int(chunk)
    if n1 == 0 or n2 == 0:
        return torch.zeros(n1, n2, dtype=torch.float64, device=x.device)
    if standardize:
        x = zscore_rows(x)
        y = zscore_rows(y)
    sigma = median_bandwidth(x, y) if sigma is None else _check_sigma(sigma)

    c1, c2 = min(chunk, n1), min(chunk, n2)
    rows = max(1, min(n_probes, _BAND_ELEMENTS // (max(c1, c2) * n_probes)))
    mode = "biased" if variant == "normalized" else variant
    sums_x = _kernel_row_sums(x, sigma, rows, chunk)
    sums_y = _kernel_row_sums(y, sigma, rows, chunk) if variant == "normalized" else None

    buf_a = torch.empty(c1 * rows * n_probes, dtype=torch.float64, device=x.device)
    buf_b = torch.empty(c2 * rows * n_probes, dtype=torch.float64, device=x.device)
    out = torch.empty(n1, n2, dtype=torch.float64, device=x.device)
    sq_x = torch.zeros(n1, dtype=torch.float64, device=x.device)  # ||H K_i H||_F^2
    sq_y = torch.zeros(n2, dtype=torch.float64, device=x.device)  # ||H L_j H||_F^2
    for is_ in _blocks(n1, chunk):
        for js in _blocks(n2, chunk):
            acc = torch.zeros(is_.stop - is_.start, js.stop - js.start, dtype=torch.float64, device=x.device)
            for a0, a1 in _row_blocks(n_probes, rows):
                r = a1 - a0
                a = _centre_band(_kernel_block(x[is_], a0, a1, sigma, buf_a), sums_x[is_], a0, a1, mode)
                b = _kernel_block(y[js], a0, a1, sigma, buf_b)
                if variant == "normalized":
                    _centre_band(b, sums_y[js], a0, a1, "biased")
                    if js.start == 0:
                        sq_x[is_] += _band_sq_norm(a, r)
                    if is_.start == 0:
                        sq_y[js] += _band_sq_norm(b, r)
                else:
                    b.sub_(1.0)  # <A, L - 1> = <A, L>; smaller numbers, less rounding
                a[:, :, r:] *= 2.0  # strictly-upper entries stand for two entries each
                acc.addmm_(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1).T)
            out[is_, js] = acc

    if variant == "biased":
        out /= (n_probes - 1) ** 2
    elif variant == "unbiased":
        out /= n_probes * (n_probes - 3)
    elif variant == "normalized":
        # The (N-1)^2 factors cancel: <Kc, Lc> / (||Kc|| ||Lc||).
        denom = torch.sqrt(sq_x.unsqueeze(1) * sq_y.unsqueeze(0))
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        out = torch.where(denom > 0, out / safe, torch.zeros_like(out)).clamp_(0.0, 1.0)
    return out


def layer_score(hsic: torch.Tensor | np.ndarray) -> float:
    r"""Per-layer bridge score from a pairwise HSIC matrix.

    ``score = 1/2 * ( mean_i max_j HSIC[i, j] + mean_j max_i HSIC[i, j] )``: every X
    neuron is matched with its most dependent Y neuron and vice versa, and the two
    directions are averaged.

    Args:
        hsic: ``[n1, n2]`` matrix from :func:`hsic_matrix`.

    Returns:
        The score as a Python float.

    Raises:
        ValueError: if the matrix is not 2-D, holds NaN/inf, or is empty (``n1 == 0`` or ``n2 == 0``,
            i.e. the layer has no overlap neurons or no bridge neurons).  Callers are
            expected to skip such layers.
    """
    m = _as_matrix(hsic, "hsic")
    if m.numel() == 0:
        raise ValueError(
            f"layer_score needs a non-empty HSIC matrix; got shape {tuple(m.shape)} "
            "(a layer without overlap or bridge neurons should be skipped)"
        )
    best_for_x = m.max(dim=1).values.mean()
    best_for_y = m.max(dim=0).values.mean()
    return float(0.5 * (best_for_x + best_for_y))


# ------------------------------------------------------------- reference (per pair)


def _pair_value(k: torch.Tensor, l: torch.Tensor, variant: str) -> float:
    """One HSIC value from two raw ``N x N`` kernels, evaluated from its formula."""
    n = k.shape[0]
    if variant in ("biased", "normalized"):

        def centre(m: torch.Tensor) -> torch.Tensor:
            return m - m.mean(dim=0, keepdim=True) - m.mean(dim=1, keepdim=True) + m.mean()

        kc, lc = centre(k), centre(l)
        if variant == "biased":
            return float((kc * lc).sum()) / (n - 1) ** 2
        kl, kk, ll = (kc * lc).sum(), (kc * kc).sum(), (lc * lc).sum()
        denom = float(torch.sqrt(kk * ll))
        return min(max(float(kl) / denom, 0.0), 1.0) if denom > 0 else 0.0
    if variant == "paper":
        hl = l - l.mean(dim=0, keepdim=True)  # H L
        return float((k * hl.T).sum())  # tr(K (H L))
    # unbiased, Song et al. (2012), literally
    kt = k.clone()
    lt = l.clone()
    kt.fill_diagonal_(0.0)
    lt.fill_diagonal_(0.0)
    term1 = (kt * lt.T).sum()  # tr(K~ L~)
    term2 = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (kt.sum(dim=0) @ lt.sum(dim=1))  # 1^T K~ L~ 1
    return float(term1 + term2 - term3) / (n * (n - 3))


def hsic_pair_loop(
    x,
    y,
    variant: str = "biased",
    sigma: float | None = None,
    *,
    standardize: bool = True,
) -> torch.Tensor:
    r"""Reference implementation of :func:`hsic_matrix` with a Python loop over pairs.

    Same preprocessing (z-scoring, median bandwidth); then, for every pair ``(i, j)``,
    both ``N x N`` kernels are built from the two rows and the estimator is evaluated
    from its textbook form: ``<H K H, H L H>/(N-1)^2`` for ``biased`` (centring by
    means), ``tr(K (H L))`` for ``paper``, Song et al.'s three-term expression on
    zero-diagonal kernels for ``unbiased``, and the cosine of the two centred kernels
    for ``normalized``.  ``O(n1 n2 N^2)`` like the vectorised version, but with the
    kernels rebuilt per pair and one small torch call sequence per pair: meant for tests
    and the benchmark, not for production.

    Args and return value: as for :func:`hsic_matrix` (``[n1, n2]`` float64 tensor).
    """
    x = _as_matrix(x, "x")
    y = _as_matrix(y, "y").to(x.device)
    n_probes = x.shape[1]
    if y.shape[1] != n_probes:
        raise ValueError(
            f"x and y need the same number of probes (columns); got {n_probes} and {y.shape[1]}"
        )
    _check_variant(variant, n_probes)
    n1, n2 = x.shape[0], y.shape[0]
    out = torch.zeros(n1, n2, dtype=torch.float64, device=x.device)
    if n1 == 0 or n2 == 0:
        return out
    if standardize:
        x = zscore_rows(x)
        y = zscore_rows(y)
    sigma = median_bandwidth(x, y) if sigma is None else _check_sigma(sigma)
    inv = -0.5 / (sigma * sigma)
    for i in range(n1):
        for j in range(n2):
            xi, yj = x[i], y[j]
            k = torch.exp(inv * (xi.unsqueeze(1) - xi.unsqueeze(0)) ** 2)
            l = torch.exp(inv * (yj.unsqueeze(1) - yj.unsqueeze(0)) ** 2)
            out[i, j] = _pair_value(k, l, variant)
    return out
