"""Benchmarks (not part of the test run). Each module runs with ``python -m bench.<name>`` and
prints ratios against a baseline measured in the same process."""
