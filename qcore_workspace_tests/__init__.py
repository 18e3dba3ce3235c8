"""Tests across the workspace's distributions: publishing, third-party plugins, import names.

A package with a name of its own: pytest imports its modules as
``qcore_workspace_tests.test_...``, never under a generic top-level name (``tests``,
``kernels``, ...) that could shadow another distribution's package
(qcore_workspace_tests/test_import_names.py checks it).
"""
