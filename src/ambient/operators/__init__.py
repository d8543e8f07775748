"""Measurement operators y = A x (+ σ_y n): ``base`` (``LinearOperator``: forward, adjoint, pinv) and
``mask`` (``MaskOperator``, missing pixels)."""

from ambient.operators.base import LinearOperator
from ambient.operators.mask import MaskOperator

__all__ = ["LinearOperator", "MaskOperator"]
