"""The SETH hardness reductions of the seed papers as runnable code.

Build a combinatorial instance (:func:`ov_instance`, :func:`gap_hamming_instance`, or your own
:class:`OVInstance` / :class:`GapHammingInstance`), reduce it to one attention call
(:func:`ov_to_attention`, :func:`gap_hamming_to_attention`), run any attnbound method as the
oracle (:func:`solve_via_attention`), and compare with brute force (:func:`solve_ov`,
:func:`solve_gap_hamming`).
"""

from .instances import (
    GapHammingInstance,
    OVInstance,
    gap_hamming_instance,
    ov_instance,
    solve_gap_hamming,
    solve_ov,
)
from .packing import PackedTransformer, pack_transformer
from .reductions import Decision, Reduction, gap_hamming_to_attention, ov_to_attention, solve_via_attention

__all__ = [
    "OVInstance",
    "GapHammingInstance",
    "ov_instance",
    "gap_hamming_instance",
    "solve_ov",
    "solve_gap_hamming",
    "Reduction",
    "Decision",
    "ov_to_attention",
    "gap_hamming_to_attention",
    "solve_via_attention",
    "pack_transformer",
    "PackedTransformer",
]
