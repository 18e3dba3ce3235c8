"""Tests of the qcore-plugin-awq distribution (plugins/awq/).

A package named for its distribution: pytest imports its modules as
``qcore_plugin_awq_tests.test_...``, never under a generic top-level name (``tests``,
``kernels``, ...) that could shadow another distribution's package
(qcore_workspace_tests/test_import_names.py checks it).
"""
