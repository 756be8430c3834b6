"""The fault corpus: hostile files, broken inputs and faults of the machine, one file per group.

    test_fault_config.py      configs and command lines: one sentence naming the key or file, exit code 2
    test_fault_archives.py    tar / zip members that try to leave their folder
    test_fault_workers.py     worker processes that die, decompression bombs
    test_fault_structures.py  structure files that would load silently wrong
    test_fault_state.py       checkpoints and caches: digests, truncation, tampering, temporary files
    test_fault_distributed.py ranks that stop answering

The `cli` fixture (tests/conftest.py) runs `esm-gearnet ...` in this process. A case is a small table row
(what is broken, what must be said); add one where its group lives.
"""
