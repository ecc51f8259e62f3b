"""Fixtures shared by the 2-process tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One thread, as the workers run (fp32 SVDs of the initialisations depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
