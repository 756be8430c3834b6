"""The fault corpus: hostile files, broken inputs and faults of the machine, one file per group.

    test_fault_config.py      configs and command lines: one sentence naming the key or file, exit code 2
    test_fault_archives.py    tar / zip members that try to leave their folder
    test_fault_workers.py     worker processes that die, decompression bombs
    test_fault_structures.py  structure files that would load silently wrong
    test_fault_state.py       checkpoints and caches: digests, truncation, tampering, temporary files
    test_fault_distributed.py ranks that stop answering

A case is a small table row (what is broken, what must be said); add one where its group lives.
"""
import sys

import pytest


@pytest.fixture
def cli(capsys):
    """Runs `esm-gearnet ARGS...` in this process: returns (exit code, stdout, stderr)."""
    from esm_gearnet.cli import main

    def run(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err
    return run
