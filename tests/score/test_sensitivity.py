"""sensitivity.json says what the scores sum: the loss of the gradient method, the KL of the KL method."""

from fp8mix.score.sensitivity import build_document
from fp8mix.score.settings import AutoQuantSettings


def test_calibration_names_what_each_method_sums(embedded):
    layout = embedded.layout
    scores = {m: 1.0 for g in layout.groups for m in g.modules}
    docs = {method: build_document("m", "f", layout, AutoQuantSettings(method=method), scores, 1, 1, {})
            for method in ("gradient", "kl_div")}
    assert "cross-entropy over the assistant reply tokens" in docs["gradient"]["calibration"]["loss"]
    kl = docs["kl_div"]["calibration"]["loss"]
    assert "KL" in kl and "text positions" in kl and "cross-entropy" not in kl
