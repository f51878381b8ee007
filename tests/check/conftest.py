import pytest


@pytest.fixture(scope="session")
def check_run(tmp_path_factory):
    """A run with every catalog scheme planned and exported (2 calibration samples: enough to rank blocks)."""
    from fp8mix.export.stage import stage_export
    from fp8mix.pipeline import RunOptions, stage_plan, stage_score

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
