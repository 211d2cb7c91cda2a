"""Metrics over embeddings: diversity (mean pairwise cosine distance), fidelity (caption matching) and
drift (Fréchet distance to the base model's images), plus mean/std of scores. Pure functions over tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_RIDGE = 1e-6  # added to the diagonal of covariances before the Fréchet distance


def pairwise_cosine_distance(emb: torch.Tensor) -> float:
    """Mean of `1 - cos(e_i, e_j)` over all pairs i < j of the rows of `emb` [N, D]; NaN when N < 2."""
    n = int(emb.shape[0])
    if n < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(emb.detach().double(), dim=-1)
    sim = unit @ unit.T
    i, j = torch.triu_indices(n, n, offset=1)
    return float((1.0 - sim[i, j]).mean())


def mean_and_covariance(x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of the rows of `x`; zero covariance for one row."""
    arr = np.asarray(
        x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64
    )
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, D] array, got shape {arr.shape}")
    mu = arr.mean(axis=0)
    if arr.shape[0] < 2:
        return mu, np.zeros((arr.shape[1], arr.shape[1]))
    centred = arr - mu
    return mu, centred.T @ centred / (arr.shape[0] - 1)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigen-decomposition (negative eigenvalues clipped to 0)."""
    sym = (matrix + matrix.T) / 2
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ1 Σ2)^{1/2}) for PSD Σ1, Σ2.

    With scipy installed, `scipy.linalg.sqrtm(Σ1 Σ2)`; otherwise the equal and numerically kinder
    tr((Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}), whose argument is symmetric PSD (same eigenvalues as Σ1 Σ2).
    """
    try:
        from scipy.linalg import sqrtm
    except ImportError:
        root1 = sqrtm_psd(sigma1)
        inner = root1 @ sigma2 @ root1
        values = np.linalg.eigvalsh((inner + inner.T) / 2)
        return float(np.sqrt(np.clip(values, 0.0, None)).sum())
    root = sqrtm(sigma1 @ sigma2)
    return float(np.real(np.trace(root)))


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of N(μ1, Σ1) and N(μ2, Σ2): |μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, dtype=np.float64)),
        np.atleast_1d(np.asarray(mu2, dtype=np.float64)),
    )
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, dtype=np.float64)),
        np.atleast_2d(np.asarray(sigma2, dtype=np.float64)),
    )
    diff = mu1 - mu2
    value = float(
        diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    )
    return max(value, 0.0)


def frechet_distance(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, ridge: float = DEFAULT_RIDGE
) -> float:
    """Fréchet distance between Gaussians fitted to the rows of `a` [N, D] and `b` [M, D].

    `ridge` is added to both covariances' diagonals: with few images per prompt the covariances are
    singular and the ridge keeps the matrix square root well defined.
    """
    mu1, s1 = mean_and_covariance(a)
    mu2, s2 = mean_and_covariance(b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"embeddings differ in width: {mu1.shape[0]} vs {mu2.shape[0]}")
    eye = np.eye(mu1.shape[0]) * ridge
    return frechet_from_stats(mu1, s1 + eye, mu2, s2 + eye)


def caption_matches(
    image_emb: torch.Tensor, text_emb: torch.Tensor, targets: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """[N] bool: whether image i's most similar caption (cosine, rows of `text_emb`) is `targets[i]`."""
    img = torch.nn.functional.normalize(image_emb.detach().double(), dim=-1)
    txt = torch.nn.functional.normalize(text_emb.detach().double().to(img.device), dim=-1)
    best = (img @ txt.T).argmax(dim=-1).cpu()
    return best == torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor) else targets).cpu()


def fidelity(image_emb: torch.Tensor, text_emb: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> float:
    """Fraction of images whose best-matching caption among the prompt set is their own prompt."""
    if int(image_emb.shape[0]) == 0:
        return float("nan")
    return float(caption_matches(image_emb, text_emb, targets).double().mean())


def mean_std(values: torch.Tensor | Sequence[float]) -> dict[str, float]:
    """{'mean', 'std'} with the population standard deviation (0 for one value), as `dag rewards --score`."""
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(t) else float("nan")}
