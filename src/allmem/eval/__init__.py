"""Evaluation: official long-context benchmark runners and metrics.

Submodules are imported on demand (``allmem.eval.metrics``, ``allmem.eval.longbench``, ...)
so that importing the package stays cheap and pulls in no optional dependency.
"""
