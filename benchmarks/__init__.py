"""idempotask benchmarks: ``python -m benchmarks`` (see ``--help``).

Each figure is printed beside its floor, measured in the same run on the same machine,
so the ratio means something even on a noisy box.
"""
