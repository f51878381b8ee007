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
def eval_samples(check_run):
    """The run's evaluation set (N_EVAL held-out samples, fitted), which the live check's engines also serve."""
    from .check_helpers import N_EVAL
    from fp8mix.evaluate.heldout import eval_set
    from fp8mix.models import loading
    from fp8mix.models.processor import load_processor

    return eval_set(check_run, N_EVAL, load_processor(loading.EMBEDDED)).samples


@pytest.fixture(scope="session")
def parity_samples(eval_samples):
    """(index in the evaluation set, sample) for its image questions (samples with images and an answer)."""
    return [(i, s) for i, s in enumerate(eval_samples) if s.images and s.answer is not None]


@pytest.fixture(scope="session")
def live_checked(check_run):
    """`fp8mix check` with the live vLLM check: the BF16 source and each scheme served by vLLM once (one engine
    start each), the evaluation set served on the same engines. The live, served-parity and served-eval tests
    share it."""
    from .check_helpers import N_EVAL
    from fp8mix.check.stage import stage_check

    return stage_check(check_run, live=True, n_eval=N_EVAL)
