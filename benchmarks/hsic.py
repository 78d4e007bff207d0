"""Benchmark: vectorised ``hsic_matrix`` against the per-pair reference loop.

Setting: n1 = n2 = 64 neurons, N = 256 probes, Gaussian random activations from a
fixed seed, torch limited to 2 threads.  For every HSIC variant the script

1. times ``hsic_matrix`` on the full 64 x 64 problem (best of 5 after a warm-up);
2. times ``hsic_pair_loop`` on a subset of the pairs (the first rows of X times all of
   Y, best of 3) and extrapolates linearly to all 64 * 64 pairs -- the per-pair work is identical
   for every pair, so the loop's cost is proportional to the number of pairs;
3. checks that both agree on the subset to ``max |diff| <= 1e-9`` (the pass/fail gate)
   and prints the difference relative to the largest value too, because at the median
   bandwidth the biased/unbiased values are only ~1e-6, which makes the absolute check
   weak for them.  (Most of the remaining difference is rounding in the loop, which
   evaluates the formulas on raw kernels; the tests check both paths at O(1) values.)

Both sides get the same explicit ``sigma`` (the median bandwidth of the full z-scored
data, computed once, its time shown separately), so that the subset loop uses exactly
the bandwidth of the full problem.  Both still z-score their inputs inside the timing.

Run:  python benchmarks/hsic.py   (exit status 1 if an equality check fails)
"""

from __future__ import annotations

import sys
import time

import torch

from langneurons.bridge.hsic import (
    VARIANTS,
    hsic_matrix,
    hsic_pair_loop,
    median_bandwidth,
    zscore_rows,
)

N1 = N2 = 64
N_PROBES = 256
SEED = 1234
LOOP_ROWS = 4  # loop timed on LOOP_ROWS x N2 pairs, then extrapolated
REPEATS = 5  # vectorised: best of 5 (after one warm-up call)
LOOP_REPEATS = 3  # loop subset: best of 3
TOL = 1e-9
TARGET_SPEEDUP = 50.0


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> int:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(N1, N_PROBES, generator=gen, dtype=torch.float64)
    # Y: half the neurons depend on X, half are independent, so values are not all ~0.
    y = torch.randn(N2, N_PROBES, generator=gen, dtype=torch.float64)
    y[: N2 // 2] += x[: N2 // 2] ** 2 + x[: N2 // 2]

    t_sigma, sigma = _best_time(lambda: median_bandwidth(zscore_rows(x), zscore_rows(y)), 1)
    n_pairs = N1 * N2
    n_sub = LOOP_ROWS * N2

    print(
        f"HSIC benchmark: n1 = {N1}, n2 = {N2}, N = {N_PROBES} probes, float64, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {SEED}"
    )
    print(f"median bandwidth sigma = {sigma:.6f} (computed once in {t_sigma * 1e3:.1f} ms, "
          "passed to both implementations)")
    print(
        f"loop timed on {n_sub} of {n_pairs} pairs ({LOOP_ROWS} X rows x {N2} Y rows) and "
        f"extrapolated x{n_pairs / n_sub:.0f} (best of {LOOP_REPEATS}); vectorised timed on "
        f"all pairs (best of {REPEATS} after a warm-up)"
    )
    print()
    header = (
        f"{'variant':<11} {'vectorised s':>13} {'loop s/pair':>12} {'loop s (all, extrap.)':>22} "
        f"{'speed-up':>9} {'max |value|':>12} {'max |diff|':>11} {'rel diff':>9} {'check':>6}"
    )
    print(header)
    print("-" * len(header))

    failed = False
    speedups = []
    for variant in VARIANTS:
        hsic_matrix(x, y, variant, sigma)  # warm-up (allocator, thread pool)
        t_vec, full = _best_time(lambda: hsic_matrix(x, y, variant, sigma), REPEATS)
        t_sub, loop = _best_time(
            lambda: hsic_pair_loop(x[:LOOP_ROWS], y, variant, sigma), LOOP_REPEATS
        )
        per_pair = t_sub / n_sub
        t_loop = per_pair * n_pairs
        diff = float((full[:LOOP_ROWS] - loop).abs().max())
        scale = float(loop.abs().max())
        rel = diff / scale if scale > 0 else diff
        ok = diff <= TOL
        failed |= not ok
        speedup = t_loop / t_vec
        speedups.append(speedup)
        print(
            f"{variant:<11} {t_vec:>13.4f} {per_pair:>12.2e} {t_loop:>22.3f} "
            f"{speedup:>8.1f}x {float(full.abs().max()):>12.3e} {diff:>11.2e} "
            f"{rel:>9.1e} {'ok' if ok else 'FAIL':>6}"
        )

    print()
    print(f"speed-up range: {min(speedups):.1f}x .. {max(speedups):.1f}x "
          f"(target >= {TARGET_SPEEDUP:.0f}x: "
          f"{'met' if min(speedups) >= TARGET_SPEEDUP else 'NOT met'})")
    if failed:
        print(f"EQUALITY CHECK FAILED: max |diff| above {TOL:g}", file=sys.stderr)
        return 1
    print(f"equality check passed for all variants (max |diff| <= {TOL:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
