import pytest


@pytest.fixture(scope="session")
def check_run(tmp_path_factory):
    """A run with every catalog scheme planned and exported (2 calibration samples: enough to rank blocks)."""
    from fp8mix.export.stage import stage_export
    from fp8mix.context import RunOptions
    from fp8mix.plan.stage import stage_plan
    from fp8mix.score.stage import stage_score

    opts = RunOptions(run=tmp_path_factory.mktemp("checkrun"), score_overrides={"calib_samples": 2, "batch_size": 2})
    stage_score(opts)
    stage_plan(opts)
    stage_export(opts)
    return opts


@pytest.fixture(scope="session")
def skeleton():
    from fp8mix.models import loading

    net, adapter = loading.build_empty(loading.EMBEDDED)
    return net, adapter, adapter.layout(net)


@pytest.fixture(scope="session")
def parity_samples():
    """The held-out image questions of the 64-sample eval set (samples with images and an answer)."""
    from fp8mix.data.sources import held_out

    return [s for s in held_out("embedded", 64) if s.images and s.answer is not None]


@pytest.fixture(scope="session")
def live_checked(check_run, parity_samples):
    """`fp8mix check` with the live vLLM check: the BF16 source and each scheme served by vLLM once (seven engine
    starts), the parity samples served on the same engines. The live tests and the served parity tests share it."""
    from .check_helpers import PARITY_REPLY_TOKENS
    from fp8mix.check.fidelity import sample_requests
    from fp8mix.check.stage import stage_check

    return stage_check(check_run, live=True, extra=sample_requests(parity_samples, max_tokens=PARITY_REPLY_TOKENS))
