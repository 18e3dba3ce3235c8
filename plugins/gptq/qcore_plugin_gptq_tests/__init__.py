"""Tests of the qcore-plugin-gptq distribution (plugins/gptq/).

A package named for its distribution: pytest imports its modules as
``qcore_plugin_gptq_tests.test_...``, never under a generic top-level name (``tests``,
``kernels``, ...) that could shadow another distribution's package
(qcore_workspace_tests/test_import_names.py checks it).
"""
