"""The reproduction experiments: one module per claim of docs/theory.md §5 (see each docstring).

Each module has ``run(scale, seed, advance) -> Result`` and ``steps(scale)``; its verdict function(s)
are pure functions of the measured data, tested on synthetic data that must pass and must fail.
"""

from . import direct_sum, families, gradient, minilm, peers, reductions, scaling, taylor_order, training, transition

EXPERIMENTS = {
    "scaling": scaling,
    "transition": transition,
    "families": families,
    "taylor_order": taylor_order,
    "direct_sum": direct_sum,
    "gradient": gradient,
    "training": training,
    "reductions": reductions,
    "minilm": minilm,
    "peers": peers,
}
