"""Measurement beside the runtime: benchmarks, line-like streams and evaluation.

What a workstation runs to size hardware and judge the model, and a line device never needs:

- `stages`, `pipelines`: stage-by-stage latency (`musc-edge bench`), ours against the original
- `line_streams`, `streams`: verdicts on line-like streams through the real line
  (`musc-edge bench line`)
- `sinks`: what the extra sinks cost the line (`musc-edge bench sinks`)
- `datasets`, `metrics`, `evaluate`: labelled test sets and the paper's metrics
  (`musc-edge eval`; `metrics` needs scikit-learn and scikit-image, the `eval` extra)
- `synthetic`: generated parts for demos and benchmarks without a dataset

The rule: this package may import the runtime (`musc_edge.runtime`) and the core
(`musc_edge`); neither of those ever imports it, so a line device installs and runs without
it (tests/test_device_install.py). The CLI's measuring commands import it inside their
functions only. This file imports nothing, so `musc_edge.bench.synthetic` costs no more than
itself.
"""
