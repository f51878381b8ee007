"""Served speed: the BF16 source and every checkpoint of a run in vLLM on a CUDA GPU (``stage``); the engine-side
timing in a standalone script run by vLLM's interpreter (``runner.py``)."""
