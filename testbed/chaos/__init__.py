"""Faults under load (issue 16): the chaos topology, its flows, the faults, the verdicts.

`scripts/chaos.py` (`make chaos`) runs them for a while over several modes and writes a
summary; tests/integration/test_faults.py runs each fault once in inpod.
"""
