"""Tests of the qcore-kernels distribution (kernels/).

A package named for its distribution: pytest imports its modules as
``qcore_kernels_tests.test_...``, never under a generic top-level name (``tests``,
``kernels``, ...) that could shadow another distribution's package
(qcore_workspace_tests/test_import_names.py checks it).
"""
