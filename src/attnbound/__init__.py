"""attnbound: self-attention with certified error bounds, and its fine-grained complexity made runnable.

    >>> import torch, attnbound
    >>> q, k, v = (torch.randn(2, 4, 1024, 16) / 4 for _ in range(3))
    >>> out, cert = attnbound.attention(q, k, v, method="auto", eps=1e-3, return_certificate=True)

See :func:`attention`, :func:`plan`, :class:`Certificate`, and the subpackages
``attnbound.hardness`` (the SETH reductions as runnable code) and ``attnbound.nn``.
"""

from .api import attention, polynomial_attention, taylor_attention
from .certificate import Certificate
from .decoding import DecodingState
from .measure import measure_error
from .planner import CostModel, Plan, calibrate, plan
from .features import feature_rank, monomial_features
from .chebyshev import chebyshev_coefficients, chebyshev_degree, chebyshev_error
from .taylor import taylor_coefficients, taylor_remainder

__version__ = "0.1.0"

__all__ = [
    "attention",
    "taylor_attention",
    "polynomial_attention",
    "Certificate",
    "DecodingState",
    "measure_error",
    "plan",
    "Plan",
    "CostModel",
    "calibrate",
    "feature_rank",
    "monomial_features",
    "chebyshev_coefficients",
    "chebyshev_degree",
    "chebyshev_error",
    "taylor_coefficients",
    "taylor_remainder",
]
