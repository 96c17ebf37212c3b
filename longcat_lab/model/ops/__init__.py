"""Hand-written autograd kernels the model calls: the grouped expert dispatch with its own backward."""

from longcat_lab.model.ops.expert_dispatch import ExpertDispatch

__all__ = ["ExpertDispatch"]
