"""Load generation and benchmarking for the inference server (and OpenAI-compatible peers).

`load_tests.loadgen` drives traffic (closed loop at fixed concurrency, open loop with Poisson
arrivals) and measures latency, time to first token, inter-token latency and throughput;
`load_tests.report` turns the results into JSON, a markdown table and PNG plots.
"""
