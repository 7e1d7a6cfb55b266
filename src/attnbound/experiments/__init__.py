"""The reproduction experiments: one module per claim of SPEC §5 (see each docstring)."""

from . import direct_sum, gradient, minilm, peers, reductions, scaling, taylor_order, transition

EXPERIMENTS = {
    "scaling": scaling,
    "transition": transition,
    "taylor_order": taylor_order,
    "direct_sum": direct_sum,
    "gradient": gradient,
    "reductions": reductions,
    "minilm": minilm,
    "peers": peers,
}
