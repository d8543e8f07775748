"""Measurement operators y = A x (+ σ_y n): ``base`` (``LinearOperator``: the contract — forward, adjoint, pinv,
observations, noise, saving), ``mask`` (``MaskOperator``, missing pixels), ``blur`` (``BlurOperator``, a known
PSF; ``gaussian_kernel``), ``kspace`` (``KSpaceOperator``, Cartesian MRI, single- and multi-coil;
``cartesian_mask``), ``specs`` (``operator_from_spec``: an operator back from its spec and arrays),
``measurements`` (measurements files: y with its operator and value range, in model units) and ``simulate``
(clean images → measurements, ``ambient measure``)."""

from ambient.operators.base import LinearOperator
from ambient.operators.blur import BlurOperator, gaussian_kernel
from ambient.operators.kspace import KSpaceOperator, cartesian_mask
from ambient.operators.mask import MaskOperator
from ambient.operators.specs import KINDS, operator_from_spec

__all__ = ["KINDS", "BlurOperator", "KSpaceOperator", "LinearOperator", "MaskOperator", "cartesian_mask",
           "gaussian_kernel", "operator_from_spec"]
