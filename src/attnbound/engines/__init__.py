"""The engines: what computes attention's numbers, below the families and the planner.

* :mod:`~attnbound.engines.registry` — one record per engine (dtypes, devices, masks, causal, autograd,
  its naive reference) and the reasons it declines a call; the planner and the run stage ask it.
* :mod:`~attnbound.engines.sdpa` — torch's fused SDPA kernel with its any-order rounding certificate.
* :mod:`~attnbound.engines.reference` — the project's dense and blockwise exact kernels.
* :mod:`~attnbound.engines.monomials` — the one owner of the monomial order every feature engine uses.
* :mod:`~attnbound.engines.features` — the chunked torch feature engine (the autograd path).
* :mod:`~attnbound.engines.fused` — the fused numba feature kernels (float64, CPU, forward only).
* :mod:`~attnbound.engines.naive` — the naive dense feature reference the fast paths are tested against.
"""
