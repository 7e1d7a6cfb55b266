"""attnbound: self-attention with certified error bounds, and its fine-grained complexity made runnable.

    >>> import torch, attnbound
    >>> q, k, v = (torch.randn(2, 4, 1024, 16) / 4 for _ in range(3))
    >>> out, cert = attnbound.attention(q, k, v, method="auto", eps=1e-3, return_certificate=True)

See :func:`attention`, :func:`plan`, :class:`Certificate`, and the subpackages
``attnbound.hardness`` (the SETH reductions as runnable code) and ``attnbound.nn``.

The names below are imported on first use, so ``import attnbound`` (and ``attnbound --help``)
does not load torch until something needs it.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "attention": ".api",
    "taylor_attention": ".api",
    "polynomial_attention": ".api",
    "Certificate": ".certificate",
    "GradientCertificate": ".gradient",
    "last_gradient_certificate": ".gradient",
    "DecodingState": ".decoding",
    "measure_error": ".measure",
    "plan": ".planner",
    "Plan": ".planner",
    "CostModel": ".planner",
    "calibrate": ".calibration",
    "feature_rank": ".engines.monomials",
    "monomial_features": ".engines.monomials",
    "chebyshev_coefficients": ".families.chebyshev",
    "chebyshev_degree": ".families.chebyshev",
    "chebyshev_error": ".families.chebyshev",
    "relative_coefficients": ".families.relative",
    "relative_eta": ".families.relative",
    "taylor_coefficients": ".families.taylor",
    "taylor_remainder": ".families.taylor",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnbound' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS})
