"""Isolation between tests that run mtlrun in this process."""

import logging

import pytest


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
