"""Autograd helpers of the backends' custom Functions (they live in the neutral core: :mod:`softmaxkit._core.autograd`)."""

from .._core.autograd import strict_once_differentiable

__all__ = ["strict_once_differentiable"]
