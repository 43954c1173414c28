"""Failures from outside the config (the GPU's memory) end in one line too, in process."""

import sys

import pytest
import torch

import mtlrun.train.loop
from mtlrun.run import cli


def test_out_of_memory_is_one_line_with_the_fix(tmp_path, monkeypatch):
    def run_out(*args):  # building the run allocates more than the GPU holds
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(mtlrun.train.loop, "build_run", run_out)
    monkeypatch.setattr(sys, "argv", ["mtlrun", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    message = str(exit_info.value.code)
    assert message.startswith("mtlrun: error: the GPU ran out of memory (CUDA out of memory. Tried to allocate")
    assert "lower trainer.batch_size" in message and "\n" not in message
