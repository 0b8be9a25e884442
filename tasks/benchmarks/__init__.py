"""Measurements that are not gates: model throughput (bench_models), segmentation against the
truth (bench_segment) and the serving load test (loadtest and its launcher and report)."""
