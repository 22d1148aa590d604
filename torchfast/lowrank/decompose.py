"""The math: truncated SVD (plain or whitened by the input covariance), spatial SVD, Tucker-2.

Everything works on a layer's weight viewed as a matrix ``W [out, D]`` that maps the layer's input
features (``D = in_features`` for a Linear, ``C_in*kh*kw`` im2col columns for a Conv2d, channel-major
like ``F.unfold``) to its outputs. Each method returns its factors and the *effective* weight
``W_hat [out, D]`` the factorized layers compute, so every method is scored the same way:
weight error ``||W - W_hat|| / ||W||`` and, given the input second moment ``C = E[x x^T]``,
output error ``sqrt(tr(dW C dW^T) / tr(W C W^T))``.

Data-aware (activation-aware) SVD: with ``C + lambda*I = L L^T`` (Cholesky, damped), the rank-r
minimizer of the output error is the truncated SVD of ``W L`` mapped back by ``L^{-1}``.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 for the sizes where it is cheap (exactness), float32 for huge matrices (speed)."""
    big = max(t.numel() for t in tensors if t is not None)
    return torch.float64 if big <= 8_000_000 else torch.float32


@contextlib.contextmanager
def linalg_threads(weight: torch.Tensor, small: int = 4_000_000):
    """One thread for the SVD/Cholesky of small and mid-size matrices: multi-threaded LAPACK gains
    nothing there and, on a loaded machine, its spin-waiting threads made an SVD 100x slower (measured:
    a 384x384 float64 SVD took 14 s on 2 busy threads, 0.08 s on one)."""
    if weight.device.type != "cpu" or weight.numel() > small:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def damped(cov: torch.Tensor, damping: float) -> torch.Tensor:
    lam = damping * cov.diagonal().mean().clamp_min(1e-12)
    return cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


def cholesky_whitener(cov: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower-triangular L with L L^T = C + lambda I; damping grows until the factorization succeeds."""
    d = damping
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(damped(cov, d))
        if int(info) == 0:
            return L
        d = max(d * 10, 1e-8)
    raise RuntimeError(f"input covariance is not positive definite even with damping {d:g}")


class SVDPrep(NamedTuple):
    """SVD of W (or of W L), with the right factor already mapped back to input space (Vh L^-1)."""
    U: torch.Tensor
    S: torch.Tensor
    Vh_in: torch.Tensor

    @property
    def full_rank(self) -> int:
        return self.S.numel()


# from this length of a matrix's short side on, the Gram route is faster than LAPACK's SVD (measured, one
# thread: 4096x25088 in 56 s instead of 279 s, 1024x4608 in 0.6 s instead of 2.2 s; 2048x2048 the same)
GRAM_MIN_SIDE = 1024


def thin_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(M, full_matrices=False)``, through the eigenvectors of the short side's Gram matrix
    when that side is long (a VGG classifier would spend minutes in the bidiagonalization).

    The short-side factor is orthonormal to working precision and the long-side one is ``M`` projected on
    it, so ``U[:, :r] S[:r] Vh[:r]`` is the projection of ``M`` on the leading ``r`` directions: exact at full
    rank, and the singular values are the norms of those projections (accurate for the kept ones).
    """
    m, n = M.shape
    if min(m, n) < GRAM_MIN_SIDE:
        return torch.linalg.svd(M, full_matrices=False)
    wide = m <= n
    G = M @ M.T if wide else M.T @ M
    _, Q = torch.linalg.eigh(G.double())
    Q = Q.flip(1).to(M.dtype)  # leading directions first
    P = Q.T @ M if wide else (M @ Q).T  # row i = s_i * (unit long-side vector i)
    S = P.norm(dim=1)
    S, order = S.sort(descending=True)
    Q, P = Q[:, order], P[order]
    zero = S <= torch.finfo(M.dtype).tiny  # a direction M has nothing along
    long_side = torch.where(zero[:, None], torch.zeros_like(P), P / S.clamp_min(torch.finfo(M.dtype).tiny)[:, None])
    if wide:
        return Q, S, long_side
    return long_side.T, S, Q.T


def svd_prep(W: torch.Tensor, cov: torch.Tensor | None = None, damping: float = 1e-2) -> SVDPrep:
    if cov is None:
        U, S, Vh = thin_svd(W)
        return SVDPrep(U, S, Vh)
    L = cholesky_whitener(cov.to(W.dtype), damping)
    U, S, Vh = thin_svd(W @ L)
    # Vh_in = Vh L^{-1}: solve X L = Vh
    Vh_in = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)
    return SVDPrep(U, S, Vh_in)


def svd_factors(prep: SVDPrep, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, D], B [out, r]) with W ~= B @ A; the singular values split evenly (sqrt) between them."""
    s = prep.S[:rank].sqrt()
    return s[:, None] * prep.Vh_in[:rank], prep.U[:, :rank] * s


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(S[:r]^2) >= energy * sum(S^2)."""
    e = S.double().pow(2)
    c = e.cumsum(0) / e.sum().clamp_min(1e-300)
    return min(int(torch.searchsorted(c, torch.tensor(energy - 1e-12, dtype=c.dtype)).item()) + 1, S.numel())


def errors(W: torch.Tensor, W_hat: torch.Tensor, cov: torch.Tensor | None) -> tuple[float, float | None]:
    """(relative weight error, relative output error on the covariance or None)."""
    dW = W - W_hat
    w_err = (dW.norm() / W.norm().clamp_min(1e-30)).item()
    if cov is None:
        return w_err, None
    cov = cov.to(W.dtype)
    num = ((dW @ cov) * dW).sum().clamp_min(0)
    den = ((W @ cov) * W).sum().clamp_min(1e-30)
    return w_err, (num / den).sqrt().item()


# ---------------------------------------------------------------- spatial SVD (Jaderberg et al.)
def spatial_matrix(W4: torch.Tensor) -> torch.Tensor:
    """[O, C, kh, kw] -> [C*kh, O*kw] (rows: input channel x kernel row; columns: output x kernel column)."""
    O, C, kh, kw = W4.shape
    return W4.permute(1, 2, 0, 3).reshape(C * kh, O * kw)


def spatial_factors(prep: SVDPrep, rank: int, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [r, C, kh, 1] vertical filters, H [O, r, 1, kw] horizontal filters) from the SVD of spatial_matrix."""
    O, C, kh, kw = shape
    s = prep.S[:rank].sqrt()
    V = (prep.U[:, :rank] * s).T.reshape(rank, C, kh, 1)
    H = (s[:, None] * prep.Vh_in[:rank]).reshape(rank, O, kw).permute(1, 0, 2).reshape(O, rank, 1, kw)
    return V.contiguous(), H.contiguous()


def spatial_effective(V: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The kh x kw kernel the (kh x 1, 1 x kw) pair computes, as [O, C*kh*kw]."""
    W4 = torch.einsum("rci,orj->ocij", V[..., 0], H[:, :, 0, :])
    return W4.reshape(W4.shape[0], -1)


def spatial_refit(V: torch.Tensor, W: torch.Tensor, cov: torch.Tensor, kw: int, damping: float) -> torch.Tensor:
    """Least-squares horizontal filters for fixed vertical ones: min E||W x - H(V x)||^2 over H."""
    r, C, kh, _ = V.shape
    eye = torch.eye(kw, dtype=V.dtype, device=V.device)
    Bm = torch.einsum("rci,jk->rjcik", V[..., 0], eye).reshape(r * kw, C * kh * kw)
    Hf = project_lstsq(W, Bm, damped(cov.to(W.dtype), damping))  # [O, r*kw]
    return Hf.reshape(W.shape[0], r, 1, kw).contiguous()


def project_lstsq(W: torch.Tensor, Bm: torch.Tensor, cov_d: torch.Tensor) -> torch.Tensor:
    """argmin_X tr((W - X Bm) C (W - X Bm)^T) = W C Bm^T (Bm C Bm^T)^-1, C the damped covariance.

    Using the same damped C as the whitened SVD keeps full-rank factorizations exact (ridge shrinkage
    would not)."""
    G = Bm @ cov_d @ Bm.T
    G = G + 1e-12 * G.diagonal().mean().clamp_min(1e-30) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G, (W @ cov_d @ Bm.T).T).T


# ---------------------------------------------------------------- Tucker-2 (Kim et al.)
def _top_left(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, _ = thin_svd(M)
    return U[:, :r], S


def mode_spectra(W4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of the input-channel (mode-1) and output-channel (mode-0) unfoldings."""
    O, C = W4.shape[:2]
    s_in = torch.linalg.svdvals(W4.transpose(0, 1).reshape(C, -1))
    s_out = torch.linalg.svdvals(W4.reshape(O, -1))
    return s_in, s_out


class Tucker(NamedTuple):
    U_in: torch.Tensor   # [C, r_in]    first 1x1 conv weight (transposed)
    core: torch.Tensor   # [r_out, r_in, kh, kw]
    U_out: torch.Tensor  # [O, r_out]   last 1x1 conv weight
    W_hat: torch.Tensor  # [O, C*kh*kw] effective weight


def tucker2(W4: torch.Tensor, r_in: int, r_out: int, cov: torch.Tensor | None = None,
            damping: float = 1e-2, hooi_iters: int = 0) -> Tucker:
    """Tucker-2 of a conv kernel: input basis from HOSVD (optionally HOOI-refined); then core and
    output basis as the best rank-r_out factorization of the kernel restricted to that input basis
    (data-aware: least-squares on the input covariance, then whitened SVD)."""
    O, C, kh, kw = W4.shape
    kk = kh * kw
    U_in, _ = _top_left(W4.transpose(0, 1).reshape(C, -1), r_in)
    if hooi_iters:
        U_out, _ = _top_left(W4.reshape(O, -1), r_out)
        for _ in range(hooi_iters):
            Y = torch.einsum("ocij,ob->bcij", W4, U_out)
            U_in, _ = _top_left(Y.transpose(0, 1).reshape(C, -1), r_in)
            Z = torch.einsum("ocij,ca->oaij", W4, U_in)
            U_out, _ = _top_left(Z.reshape(O, -1), r_out)
    W = W4.reshape(O, -1)
    Q = torch.kron(U_in.T.contiguous(), torch.eye(kk, dtype=W.dtype, device=W.device))  # [r_in*kk, C*kk]
    if cov is None:
        W_red, cov_red = W @ Q.T, None
    else:
        cov_d = damped(cov.to(W.dtype), damping)
        cov_red = Q @ cov_d @ Q.T  # already damped: the whitened SVD below adds no more
        W_red = project_lstsq(W, Q, cov_d)
    A, B = svd_factors(svd_prep(W_red, cov_red, 0.0), r_out)  # A: [r_out, r_in*kk], B: [O, r_out]
    return Tucker(U_in, A.reshape(r_out, r_in, kh, kw), B, B @ A @ Q)
