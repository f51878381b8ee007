"""The report's served-speed section from synthetic bench.json documents."""

from fp8mix.report.speed import section


def _bench(device, engine):
    row = {"scheme": "bf16", "ok": True, "workloads": {"mixed": {"median": 1000.0, "spread": 0.1}},
           "speedup_vs_bf16": {"mixed": 1.0}}
    return {"device": device, "engine": engine, "vllm_version": "0.0-test", "repeats": 3, "rows": [row]}


def test_the_header_names_the_gpus_one_engine_used_and_its_mode():
    """bench serves each model on one GPU of the machine (tensor_parallel_size 1) whatever the count visible, and
    says eager where bench.json's engine ran without CUDA graphs."""
    text = "\n".join(section(_bench({"name": "H200", "count": 8}, {"enforce_eager": False}), {}))
    assert "on 1× H200, CUDA graphs on" in text and "8×" not in text
    text = "\n".join(section(_bench({"name": "H200", "count": 8}, {"enforce_eager": True,
                                                                   "tensor_parallel_size": 2}), {}))
    assert "on 2× H200, eager (no CUDA graphs)" in text and "CUDA graphs on" not in text
