"""The KL score written straight from its definition, to test fp8mix's fast pass against (and to time it in
benchmarks/bench_kl.py): for each group, a full forward with only that group in FP8, the full logits, and
Σ over the text positions (evaluate.metrics.counted_positions) of KL(p_BF16 ‖ p_group-FP8); and the study control's
figure for one block choice the same way."""

import torch
import torch.nn.functional as F

from fp8mix.data.samples import model_inputs
from fp8mix.evaluate.metrics import counted_positions, placeholder_ids
from fp8mix.quant.weights import QuantizedWeights


@torch.no_grad()
def kl_scores_reference(model, groups, batches, fmt) -> dict[str, float]:
    qw = QuantizedWeights(model, [g.modules for g in groups], fmt)
    qw.calibrate(model, batches)
    placeholders = placeholder_ids(model.config)
    out = {m: 0.0 for g in groups for m in g.modules}

    def logprobs(batch, text):
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
        return F.log_softmax(logits.float(), dim=-1)[text.to(logits.device)]

    for batch in batches:
        text = counted_positions(batch, placeholders)[0]
        ref = logprobs(batch, text)
        for g in groups:
            mods = [qw.modules[n] for n in g.modules]
            for n, mod in zip(g.modules, mods):
                mod.forward = lambda x, n=n: qw.output(n, x)
            try:
                logq = logprobs(batch, text)
            finally:
                for mod in mods:
                    del mod.forward
            out[g.modules[0]] += float(F.kl_div(logq, ref, reduction="sum", log_target=True))
    return out


@torch.no_grad()
def control_kl_reference(model, layout, blocks, batches, fmt, calib_batches=None) -> float:
    """The control's figure for one block choice straight from its definition: KL(p_BF16 ‖ p_choice) per text
    position, the blocks in `blocks` in FP8 (fp8_static's input scales from `calib_batches`, as export calibrates
    the checkpoint's, else from `batches`), full forwards and full logits."""
    qw = QuantizedWeights(model, [g.modules for g in layout.groups], fmt)
    qw.calibrate(model, calib_batches or batches)
    placeholders = placeholder_ids(model.config)
    mods = {n: qw.modules[n] for g in layout.groups if g.block in blocks for n in g.modules}
    total, count = 0.0, 0
    for batch in batches:
        text = counted_positions(batch, placeholders)[0]
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
        ref = F.log_softmax(logits.float(), dim=-1)[text.to(logits.device)]
        for n, mod in mods.items():
            mod.forward = lambda x, n=n: qw.output(n, x)
        try:
            logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
        finally:
            for mod in mods.values():
                del mod.forward
        logq = F.log_softmax(logits.float(), dim=-1)[text.to(logits.device)]
        total += float(F.kl_div(logq, ref, reduction="sum", log_target=True))
        count += int(text.sum())
    return total / count
