"""Benchmark harnesses behind `weavelm bench` and `weavelm tune` (random-weight real shapes,
timers, the split tuner). Imported by the CLI only when a benchmark runs; the engine never
imports this package."""
