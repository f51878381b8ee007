"""fp8mix eval as a stage: what it refuses before loading anything."""

import pytest

from fp8mix.context import RunOptions
from fp8mix.errors import FP8MixError
from fp8mix.evaluate.stage import stage_eval

CATALOG = """version: 1
schemes:
  bf16: {rule: {blocks_fraction: 0.25}, rationale: "named like the reference"}
  ok: {rule: {blocks_fraction: 0.5}, rationale: "x"}
"""


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_a_scheme_named_like_the_reference_is_one_clear_line(tmp_path, engine):
    """The BF16 reference's rows, served outputs and tallies are all named "bf16": a scheme of that name would be
    served as the source and reported as the reference's numbers. The catalog refuses the name, so eval stops
    before loading anything."""
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    opts = RunOptions(run=tmp_path, catalog=str(tmp_path / "catalog.yaml"), device="cpu")
    with pytest.raises(FP8MixError, match="scheme name 'bf16' is the BF16 source's name") as err:
        stage_eval(opts, engine=engine)
    assert "\n" not in str(err.value)
