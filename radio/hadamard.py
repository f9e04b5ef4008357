"""Exact normalised Hadamard matrices (H @ H.T = I, |H_ij| = 1/sqrt(n)) for PHI-S.

Constructions (all exact, no approximation):

* Sylvester: ``H_1 = [1]``, ``H_{2m} = [[H_m, H_m], [H_m, -H_m]]`` (any power of 2);
* Paley I: order ``q + 1`` for a prime ``q = 3 (mod 4)`` (e.g. 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84);
* Paley II: order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (e.g. 28, 36, 60, 76, 108);
* Kronecker products with Sylvester matrices: order ``2^k * m`` for any base order ``m`` above.

Only prime ``q`` is supported by the Paley constructions (not prime powers, which need finite-field
arithmetic), so e.g. 52 (= 2 * 26, q = 25) is not built. Every common teacher width (256, 384, 768, 1024,
1152, 1280, 1536, 4096) is covered; ``hadamard(n)`` raises ``ValueError`` for sizes without a construction.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["hadamard", "hadamard_exists", "hadamard_unnormalized"]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    f = 3
    while f * f <= q:
        if q % f == 0:
            return False
        f += 2
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) Jacobsthal matrix Q_ij = chi(j - i), chi the quadratic character mod prime q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime with q = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, Q]] is skew-symmetric."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1), q prime with q = 1 mod 4: expand the symmetric conference matrix
    C = [[0, 1^T], [1, Q]] by 0 -> [[1, -1], [-1, -1]] and +-1 -> +-[[1, 1], [1, -1]]."""
    m = q + 1
    c = torch.zeros(m, m, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, sign_block) + torch.kron((c == 0).double(), zero_block)


def _base_matrix(m: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order m from Paley I/II (or m in {1, 2}), else None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


@functools.lru_cache(maxsize=64)
def _construct(n: int) -> torch.Tensor | None:
    # n = 2^k * m: try the largest Paley base first (fewest Kronecker steps), down to m = 1 (pure Sylvester).
    k = 0
    candidates = []
    while n % (1 << k) == 0 and (1 << k) <= n:
        candidates.append((k, n >> k))
        k += 1
    for k, m in candidates:
        base = _base_matrix(m)
        if base is None:
            continue
        syl = torch.ones(1, 1, dtype=torch.float64)
        h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        for _ in range(k):
            syl = torch.kron(syl, h2)
        return torch.kron(syl, base)
    return None


def hadamard_exists(n: int) -> bool:
    """Whether ``hadamard(n)`` can build a matrix of order n."""
    return isinstance(n, int) and n >= 1 and _construct(n) is not None


def _suggest(n: int) -> list[int]:
    lo = [m for m in range(max(1, n - 64), n) if _construct(m) is not None][-2:]
    hi = [m for m in range(n + 1, n + 65) if _construct(m) is not None][:2]
    return lo + hi


def hadamard_unnormalized(n: int) -> torch.Tensor:
    """(n, n) float64 matrix of +-1 entries with H H^T = n I. Raises ValueError if no construction is known."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"hadamard: n must be a positive int, got {n!r}")
    h = _construct(n)
    if h is None:
        raise ValueError(
            f"hadamard: no exact Hadamard matrix construction is known here for n={n} (Hadamard orders are 1, 2 "
            f"or multiples of 4 of the form 2^k*(q+1) or 2^k*2(q+1), q prime); nearby sizes that work: "
            f"{_suggest(n)}. Use a feature width such as these, or another normaliser than PHI-S."
        )
    return h.clone()


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) normalised Hadamard matrix: entries +-1/sqrt(n), H @ H.T = I (exact up to rounding)."""
    return (hadamard_unnormalized(n) / float(n) ** 0.5).to(dtype)
