"""Load tests and benchmarks that measure the ASR service's speed and accuracy against the shared eval set."""
