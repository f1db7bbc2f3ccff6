"""The engine: continuous batching of DSpark speculative decoding over any runtime."""
