"""Coefficient estimators: one pluggable family behind the one coefficient slot."""

from nanmerge.coefficients._diagnose import diagnose
from nanmerge.coefficients._estimators import (
    ESTIMATORS,
    EstimatorSpec,
    RecipeFacts,
    cancellation_warning,
    check_options,
    from_file,
    get_estimator,
    inverse_norm_weights,
    manual,
    nan,
    near_uniform_warning,
    uniform,
)
from nanmerge.coefficients._norms import identical_models, model_norms, tensor_norms

__all__ = [
    "ESTIMATORS",
    "EstimatorSpec",
    "RecipeFacts",
    "cancellation_warning",
    "check_options",
    "diagnose",
    "from_file",
    "get_estimator",
    "identical_models",
    "inverse_norm_weights",
    "manual",
    "model_norms",
    "nan",
    "near_uniform_warning",
    "tensor_norms",
    "uniform",
]
