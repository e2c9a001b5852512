"""Kept only for test_exactness.py and test_errors.py, which still import ``reference``;
the reference lives in the package: :mod:`djinn_nb.core.reference`. Delete this file
once those two import from there."""
from djinn_nb.core.reference import generate, hf_model  # noqa: F401
