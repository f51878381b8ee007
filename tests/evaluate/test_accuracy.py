"""Answers are compared normalised (first sentence, case, punctuation, whitespace); flips count changed replies."""

from fp8mix.data.samples import ChatSample, assistant_turn, user_turn
from fp8mix.evaluate.accuracy import accuracy_of, flips, normalise


def _sample(answer):
    return ChatSample([user_turn("Q?"), assistant_turn(answer or "x")], [], answer, "test")


def test_normalise_keeps_the_first_sentence_without_case_or_punctuation():
    assert normalise("  The Circle.  ") == normalise("the circle") == "the circle"
    assert normalise("Red. It is the only red shape!") == "red"
    assert normalise("It is 3.5 cm long. Then more.") == "it is 3 5 cm long"  # "3.5" does not end a sentence
    assert normalise("Two\nshapes are red.") == "two"
    assert normalise("Yes!!") == normalise("yes?") == "yes"
    assert normalise("well-known,   isn't it") == "well known isn t it"
    assert normalise("") == ""


def test_accuracy_normalised_and_exact():
    samples = [_sample("Red."), _sample("The circle."), _sample("Three."), _sample(None)]
    replies = ["red", "The circle. It is at the top.", "Three.", "anything"]
    got = accuracy_of(replies, samples)
    assert got["n_answers"] == 3  # the sample without an answer is not scored
    assert got["answer_accuracy"] == 1.0
    assert got["answer_exact_match"] == 1 / 3
    wrong = accuracy_of(["Blue.", "The square", "three", "x"], samples)
    assert wrong["answer_accuracy"] == 1 / 3 and wrong["answer_exact_match"] == 0.0
    none = accuracy_of(["a"], [_sample(None)])
    assert none["n_answers"] == 0 and none["answer_accuracy"] != none["answer_accuracy"]  # NaN, not 0 or 1


def test_flips_count_replies_that_change_after_normalisation():
    bf16 = ["Red.", "The circle.", "A tabby cat looking to the side.", "Two."]
    assert flips(bf16, bf16) == 0
    assert flips(["red", "the circle", "A tabby cat. Looking away.", "Three."], bf16) == 2
