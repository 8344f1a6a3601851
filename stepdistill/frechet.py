"""The Frechet distance between two Gaussians: the one implementation every FID in stepdistill uses.

At the bottom of the house (numpy and scipy only), so `evaluate.fid` and `shapes_eval` both import it and
neither imports the other for it. Re-exported as `stepdistill.evaluate.frechet_distance`.
"""
from __future__ import annotations

import numpy as np

from .errors import StepdistillError


def _sqrtm(a: np.ndarray) -> np.ndarray:
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():  # "matrix is singular" is handled by the caller (eps offset)
        warnings.simplefilter("ignore")
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).
    Same numerics as pytorch-fid / clean-fid: ``scipy.linalg.sqrtm``; if the product is near-singular (non-finite
    square root) ``eps`` is added to both diagonals; a complex result with a negligible imaginary diagonal is
    replaced by its real part (a large imaginary component is an error).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise StepdistillError(
            f"FID statistics have different dimensions ({mu1.shape[0]} vs {mu2.shape[0]} features); "
            "compute both with the same --backbone")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2)
                 - 2.0 * _trace_sqrt_product(sigma1, sigma2, eps))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """Tr sqrt(sigma1 sigma2) the pytorch-fid way. (For 2048-d features sqrtm takes ~20 s on a 2-core CPU.)"""
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Frechet distance: imaginary component {m} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(np.trace(covmean))
