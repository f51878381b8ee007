"""Parity of fp8mix's AutoQuant gradient score with NVIDIA ModelOpt's ``mtq.auto_quantize(method="gradient")``.

Both run on the embedded tiny Qwen2.5-VL in float32, on the same text-only calibration batches (ModelOpt's
auto_quantize feeds text): fp8mix in this environment, ModelOpt in its own (``make modelopt-env`` builds
``.venv-modelopt``; ModelOpt 0.47 pins transformers < 5.15) through ``tests/parity/modelopt_scores.py``.

What is asserted, per LinearGroup (ModelOpt keys a group by its first module's name):

* calibration: every module's static input amax (fp8mix: ``input_scale * 448``) and per-tensor weight amax
  equal ModelOpt's to float32 rounding (measured: <= 5e-8 relative; the max covers padding tokens in both);
* ranking: Spearman rho >= 0.95 (the issue's bar; measured 1.0);
* values: the median relative difference of the group scores <= 1e-4 (measured 3e-7), the same most sensitive
  group, and every group whose FP8 weight codes are identical in both tools agrees to <= 1e-4 (measured
  <= 1.2e-6, the rest is float32 summation order).

The one known difference is the weight scale rounding. fp8mix quantizes weights as compressed-tensors writes
them, ``w / (amax / 448)`` (what vLLM serves); ModelOpt computes ``w * (448 / amax)`` with ``448 / amax``
rounded to float32 first. BF16 weights sit exactly on FP8 rounding ties often (e.g. amax = 13/64 and
w = 39/1024: w * 448 / amax = 84, halfway between 80 and 88): compressed-tensors rounds the exact tie to even,
ModelOpt's rounded factor pushes it to one side. In the embedded model this flips 1777 codes of layer 1's
gate_proj and 303 of layer 2's k_proj and moves those two groups' scores by ~1%; such groups are allowed 5%.
Emulating ModelOpt's weight rounding inside fp8mix brings them to 1.2e-6 (and ModelOpt's whole fake-quant
path, 448/amax on the inputs too, to 9e-8), so loss normalisation, padding and calibration match exactly.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.modelopt

ROOT = Path(__file__).resolve().parents[2]
MODELOPT_PY = ROOT / ".venv-modelopt" / "bin" / "python"
REF_SCRIPT = Path(__file__).resolve().parent / "modelopt_scores.py"

N_BATCHES, BATCH_SIZE = 4, 4
RHO_MIN = 0.95             # the acceptance bar
MEDIAN_REL_MAX = 1e-4      # measured 3e-7
SAME_CODES_REL_MAX = 1e-4  # groups with identical FP8 weights in both tools; measured <= 1.2e-6
TIE_REL_MAX = 0.05         # groups where ModelOpt's 448/amax rounding flips tied weight codes; measured 1.2%
AMAX_REL_TOL = 1e-6        # measured <= 5e-8 (float32 rounding of the scale round trip)

if not MODELOPT_PY.exists():
    pytest.skip(f"ModelOpt environment missing ({MODELOPT_PY.relative_to(ROOT)}); build it with "
                "`make modelopt-env`", allow_module_level=True)


def _text_batches(processor) -> list[dict[str, torch.Tensor]]:
    """N_BATCHES batches of BATCH_SIZE text-only embedded calibration samples, right-padded to one length."""
    from fp8mix.data import samples, sources

    chats = [s.without_images() for s in sources.embedded("calib", N_BATCHES * BATCH_SIZE)]
    encs = [samples.encode(processor, chats[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]) for i in range(N_BATCHES)]
    length = max(e["input_ids"].shape[1] for e in encs)
    fill = {"input_ids": processor.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
    batches = []
    for e in encs:
        assert "pixel_values" not in e
        pad = length - e["input_ids"].shape[1]
        batches.append({k: torch.nn.functional.pad(e[k].long(), (0, pad), value=v) for k, v in fill.items()})
    return batches


def _modelopt_weight_codes(w: torch.Tensor) -> torch.Tensor:
    """FP8 weight codes as ModelOpt's fp8 fake-quant computes them: w * (448 / amax), the factor in float32."""
    w = w.detach().float()
    return (w * (448.0 / w.abs().amax())).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    from dataclasses import replace

    from safetensors.torch import save_file

    from fp8mix.models import loading
    from fp8mix.quant.numerics import FP8Format
    from fp8mix.quant.weights import QuantizedWeights
    from fp8mix.score.autoquant import gradient_scores

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("modelopt_parity")
    lm = loading.load(None, dtype=torch.float32)
    groups = list(lm.layout.groups)
    names = [m for g in groups for m in g.modules]
    # ModelOpt's auto_quantize scores every module with its own scales (it shares them in fused layers only when
    # exporting), so here each module is a group of its own; fp8mix's scoring shares them as its checkpoint does
    unshared = [replace(g, modules=(m,), shapes=(s,), params=s[0] * s[1])
                for g in groups for m, s in zip(g.modules, g.shapes)]
    batches = _text_batches(lm.processor)
    batch_file = tmp / "batches.safetensors"
    save_file({k: torch.stack([b[k] for b in batches]).contiguous() for k in batches[0]}, str(batch_file))

    # ModelOpt first, in its own venv (it only reads the files).
    out = tmp / "modelopt_scores.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(MODELOPT_PY), str(REF_SCRIPT), "--model", str(loading.EMBEDDED), "--batches", str(batch_file),
         "--out", str(out), "--dtype", "float32", "--threads", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"modelopt_scores.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    ref = json.loads(out.read_text())
    t_modelopt = time.perf_counter() - t0

    t0 = time.perf_counter()
    module_scores = gradient_scores(lm.model, unshared, batches, FP8Format.fp8_static)
    qw = QuantizedWeights(lm.model, [g.modules for g in unshared], FP8Format.fp8_static)
    qw.calibrate(lm.model, batches)
    t_fp8mix = time.perf_counter() - t0

    ours = np.array([sum(module_scores[m] for m in g.modules) for g in groups])
    theirs = np.array([ref["groups"][g.modules[0]]["score"] if g.modules[0] in ref["groups"] else np.nan
                       for g in groups])
    same_codes = [all(torch.equal(qw.weights[m][0].view(torch.uint8),
                                  _modelopt_weight_codes(qw.modules[m].weight).view(torch.uint8))
                      for m in g.modules) for g in groups]
    print(f"\nModelOpt {ref['modelopt_version']} {t_modelopt:.1f}s, fp8mix {t_fp8mix:.1f}s")
    return {"lm": lm, "groups": groups, "ref": ref, "qw": qw, "ours": ours, "theirs": theirs,
            "same_codes": same_codes}


def test_reference_setup(parity):
    """ModelOpt ran FP8_DEFAULT_CFG as static per-tensor E4M3 on the same groups and batches, in float32."""
    ref, groups = parity["ref"], parity["groups"]
    assert ref["dtype"] == "float32"
    assert ref["n_batches"] == N_BATCHES and ref["batch_shape"][0] == BATCH_SIZE
    for kind in ("input", "weight"):
        q = ref["quantizer"][kind]
        assert q["num_bits"] == [4, 3] and q["axis"] is None and q["block_sizes"] is None, q
        assert not q["dynamic"] and q["enabled"] and q["amax"].startswith("static per-tensor"), q
    assert set(ref["groups"]) == {g.modules[0] for g in groups}
    for g in groups:
        assert tuple(ref["groups"][g.modules[0]]["modules"]) == g.modules


def test_calibrated_amax_matches(parity):
    """Static input amax (max |x| over all tokens, padding included) and per-tensor weight amax."""
    qw, ref = parity["qw"], parity["ref"]
    worst = {"input": 0.0, "weight": 0.0}
    for g in parity["groups"]:
        for m in g.modules:
            theirs = ref["groups"][g.modules[0]]["amax"][m]
            ours = {"input": float(qw.input_scales[m].reshape(())) * 448.0,
                    "weight": float(qw.weights[m][1].reshape(())) * 448.0}
            for kind in ("input", "weight"):
                rel = abs(ours[kind] - theirs[kind]) / theirs[kind]
                worst[kind] = max(worst[kind], rel)
                assert rel <= AMAX_REL_TOL, f"{m} {kind} amax: fp8mix {ours[kind]!r}, ModelOpt {theirs[kind]!r}"
    print(f"\nmax relative amax difference: {worst}")


def test_scores_rank_correlation(parity):
    from scipy.stats import spearmanr

    ours, theirs = parity["ours"], parity["theirs"]
    assert np.isfinite(theirs).all() and (theirs > 0).all()
    rho = spearmanr(ours, theirs).statistic
    print(f"\nSpearman rho = {rho:.6f} over {len(ours)} groups")
    assert rho >= RHO_MIN


def test_scores_values(parity):
    groups, ours, theirs, same = parity["groups"], parity["ours"], parity["theirs"], parity["same_codes"]
    rel = np.abs(ours - theirs) / theirs
    print(f"\nrelative difference: median {np.median(rel):.2e}, max {rel.max():.2e} "
          f"({groups[int(rel.argmax())].name}); groups with tie-flipped weight codes: "
          f"{[g.name for g, s in zip(groups, same) if not s]}")
    assert np.median(rel) <= MEDIAN_REL_MAX
    assert groups[int(ours.argmax())].name == groups[int(theirs.argmax())].name
    for g, r, s in zip(groups, rel, same):
        limit = SAME_CODES_REL_MAX if s else TIE_REL_MAX
        assert r <= limit, f"{g.name}: fp8mix {ours[groups.index(g)]:.6e} vs ModelOpt " \
                           f"{theirs[groups.index(g)]:.6e} (rel {r:.2e} > {limit:g}; same FP8 weights: {s})"
