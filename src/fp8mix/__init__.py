"""fp8mix: sensitivity-guided FP8 mixed precision for vision-language models served by vLLM."""

__version__ = "0.1.0"
