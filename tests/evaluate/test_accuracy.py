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


def test_prompt_batches_hold_at_most_a_count_and_a_number_of_padded_tokens(embedded):
    from fp8mix.data import sources
    from fp8mix.evaluate.accuracy import prompt_batches

    samples = sources.embedded("eval", 5)
    sizes = lambda batches: [b["input_ids"].shape[0] for b in batches]  # noqa: E731
    assert sizes(prompt_batches(embedded.processor, samples, "cpu")) == [5]
    assert sizes(prompt_batches(embedded.processor, samples, "cpu", batch_size=2)) == [2, 2, 1]
    lengths = [100, 100, 300, 100, 100]
    assert sizes(prompt_batches(embedded.processor, samples, "cpu", lengths=lengths, max_tokens=400)) == [2, 1, 2]
    one = prompt_batches(embedded.processor, samples, "cpu")[0]
    split = prompt_batches(embedded.processor, samples, "cpu", batch_size=2)
    ids = lambda b: [[t for t, m in zip(r, mk) if m] for r, mk in zip(b["input_ids"].tolist(),  # noqa: E731
                                                                      b["attention_mask"].tolist())]
    assert ids(one) == [r for b in split for r in ids(b)]  # the same prompts, in order


def test_an_answer_with_no_words_is_not_scored():
    """An empty or punctuation-only reference answer normalises to nothing: an empty reply would match it."""
    samples = [_sample("Red."), _sample(""), _sample(" ... ")]
    got = accuracy_of(["blue", "", "..."], samples)
    assert got["n_answers"] == 1 and got["answer_accuracy"] == 0.0 and got["answer_exact_match"] == 0.0
    none = accuracy_of([""], [_sample("")])
    assert none["n_answers"] == 0 and none["answer_accuracy"] != none["answer_accuracy"]


def test_replies_are_plain_greedy_whatever_the_models_generation_settings(embedded):
    """A released checkpoint's generation_config.json may set e.g. repetition_penalty (Qwen2.5-VL-Instruct's
    says 1.05), which transformers applies to every call that leaves it unset and vLLM's greedy SamplingParams do
    not: the eval's replies must be the argmax path either way."""
    import torch

    from fp8mix.data import sources
    from fp8mix.evaluate.accuracy import generate, prompt_batches

    model, proc = embedded.model, embedded.processor
    batches = prompt_batches(proc, sources.embedded("eval", 6), "cpu")
    plain = generate(model, proc, batches)
    kept = model.generation_config
    settings = model.generation_config.to_dict()
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 2
    try:
        with torch.no_grad():  # the settings do change what transformers generates when left in force
            out = model.generate(**batches[0], max_new_tokens=32, do_sample=False)
        penalised = [t.strip() for t in proc.batch_decode(out[:, batches[0]["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)]
        assert penalised != plain
        assert generate(model, proc, batches) == plain
        assert model.generation_config is kept  # put back
    finally:
        model.generation_config = type(kept).from_dict(settings)
