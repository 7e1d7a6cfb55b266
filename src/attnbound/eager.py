"""Running attnbound's calls eagerly inside ``torch.compile``: a clean graph break, the same tensors and
certificates as without compilation.

A certified call computes statistics, plans on Python floats, may run numba kernels and returns a
:class:`~attnbound.Certificate` — nothing a compiler graph can hold, and dynamo tracing into it either
fails (the numba dispatch) or recompiles on every new value of a planned degree. :func:`eager_only` marks a
function so that, while dynamo traces a caller, the call is left out of the graph (``torch.compiler.disable``)
and runs as ordinary Python; outside compilation it is the plain function. The compiler is imported only
when a compilation is under way, so ``import attnbound`` stays light. Autograd is unaffected: the eager
call records its own graph, and gradients flow through the graph break as through any other.
"""

from __future__ import annotations

import functools

import torch

_DISABLED: dict = {}


def _disabled(fn):
    out = _DISABLED.get(fn)
    if out is None:
        out = _DISABLED[fn] = torch.compiler.disable(fn)
    return out


def eager_only(fn):
    """``fn``, run eagerly (left out of the graph) whenever torch.compile traces a call to it."""

    @functools.wraps(fn)
    def eager(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _disabled(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return eager
