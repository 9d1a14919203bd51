"""Model loading and optimization: spec resolution (sources), loading (loader), the decoder (llama)."""
