"""qcore's conformance kit on the three checkpoint formats."""

from __future__ import annotations

import pytest

from qcore.testing import BaseCheckpointFormatTests
from qcore_plugin_interop.awq import AWQFormat
from qcore_plugin_interop.compressed_tensors import CompressedTensorsFormat
from qcore_plugin_interop.gptq import GPTQFormat


class TestCompressedTensors(BaseCheckpointFormatTests):
    @pytest.fixture
    def checkpoint_format(self):
        return CompressedTensorsFormat()


class TestGPTQ(BaseCheckpointFormatTests):
    @pytest.fixture
    def checkpoint_format(self):
        return GPTQFormat()


class TestAWQ(BaseCheckpointFormatTests):
    @pytest.fixture
    def checkpoint_format(self):
        return AWQFormat()
