"""Decoding: the search (greedy, beam, sampling; HF's semantics) over a step function, and each
model family's prefill and one-token steps over its KV caches."""
