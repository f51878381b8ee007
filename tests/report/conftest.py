import pytest


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A whole run of the embedded model on few samples, without the live vLLM check (tests/check has it)."""
    from fp8mix.context import RunOptions
    from fp8mix.pipeline import run_all

    opts = RunOptions(run=tmp_path_factory.mktemp("fullrun"), score_overrides={"calib_samples": 4, "batch_size": 4})
    args = {"eval": {"n_eval": 8, "engine": "transformers"}, "check": {"live": False}, "study": {"n_control": 8}}
    run_all(opts, None, args)
    return opts, args
