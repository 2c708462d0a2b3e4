"""Moved: the checks of a setting live in :mod:`experiments.common.settings` (kept until every
caller imports them from there)."""
from ..common.settings import flag, number_in, whole_number  # noqa: F401
