"""Benchmarks of emergence-ray against plain torch and torchrun; `python benchmarks/run.py --help`.

Modules: `common` (workloads, data, timing helpers), `torch_baseline` ((a) one process, (b)
torchrun DDP), `ray_loop` ((c) the service's Ray Data path under Ray Train), `ingest`,
`time_to_accuracy`, `first_step`, `results` (writes RESULTS.md), `run` (the one command) and
`gpu` (standalone single-GPU benchmark).
"""
