"""aiocronlock's benchmarks, each measuring the library and its comparison in one run.

Run ``python -m benchmarks --help``; ``benchmarks/README.md`` describes each benchmark
and holds the figures of the last full run.
"""
