"""Isolation between tests that run mtlrun in this process, and the one-thread fixture tiny models use."""

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _drop_run_log_handlers():
    """An in-process `cli.main()` leaves Hydra's file handler on the root logger, writing to that test's run
    directory (which a refused run removes again): later tests must not log into it."""
    before = set(logging.getLogger().handlers)
    yield
    for handler in set(logging.getLogger().handlers) - before:
        if isinstance(handler, logging.FileHandler):
            logging.getLogger().removeHandler(handler)
            handler.close()


@pytest.fixture
def one_thread():
    """Tiny models train faster on one torch thread, and do not fight the other test processes for the cores
    (`make test` sets OMP_NUM_THREADS=1 already; this holds for a plain pytest run too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
