"""Tests of the qcore distribution (core/).

A package named for its distribution: pytest imports its modules as
``qcore_tests.test_...``, never under a generic top-level name (``tests``,
``kernels``, ...) that could shadow another distribution's package
(qcore_workspace_tests/test_import_names.py checks it).
"""
