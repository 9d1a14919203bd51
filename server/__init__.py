"""HTTP layer of the inference server."""
