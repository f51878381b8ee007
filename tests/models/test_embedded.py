"""The embedded model's claim: it answers the held-out shapes questions, and only with the right images."""

from fp8mix.data import shapes
from fp8mix.evaluate.accuracy import answer_accuracy


def test_accuracy_needs_the_images(embedded):
    held_out = shapes.samples("eval", 48)
    acc = answer_accuracy(embedded.model, embedded.processor, held_out)
    shuffled = answer_accuracy(embedded.model, embedded.processor, held_out, shuffle_images=True)
    assert acc >= 0.75, acc
    assert acc - shuffled >= 0.20, (acc, shuffled)
