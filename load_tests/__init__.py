"""Load generation and benchmarking for the inference server (and OpenAI-compatible peers).

Tooling kept apart from the product: not installed with the server, run from the repository root
(``python -m load_tests.<module>``), its dependencies in the ``tools`` extra.
`load_tests.loadgen` drives traffic (closed loop at fixed concurrency, open loop with Poisson
arrivals) and measures latency, time to first token, inter-token latency and throughput;
`load_tests.report` turns the results into JSON, a markdown table and PNG plots.
"""
