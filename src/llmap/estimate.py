"""Deprecated: ``llmap estimate`` moved to :mod:`llmap.observe.estimate`.

This module re-exports the old names for one release and will then be
removed. (Token estimators are :mod:`llmap.control.tokens`.)
"""

from llmap.observe.estimate import Estimate, ModelCost, estimate
from llmap.observe.estimate_table import estimate_text, format_estimate

__all__ = ["Estimate", "ModelCost", "estimate", "estimate_text", "format_estimate"]
