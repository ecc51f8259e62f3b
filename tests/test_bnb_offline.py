"""bitsandbytes under rankwise's offline policy."""

from __future__ import annotations

import logging

import pytest

from rankwise import quant

pytest.importorskip("bitsandbytes")


def test_offline_hub_kernel_notice_is_filtered_and_other_warnings_are_not(caplog):
    """bitsandbytes' 'could not fetch the CPU GEMM from kernels-community' notice (rankwise runs offline; it then
    uses its own kernel) is dropped by require_bnb's filter; the same logger's other warnings still show."""
    quant.require_bnb()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "offline")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
