"""The node check (``python -m pipeline.doctor``, ``dim-doctor``): one module per section."""

from pipeline.doctor.cli import main, run_checks
from pipeline.doctor.row import Row

__all__ = ["Row", "main", "run_checks"]
