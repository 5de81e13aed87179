"""The testbed VLM: scene/question generator, tokenizer, loader, trained accuracy and image dependence."""
import json
import os

import numpy as np
import pytest
import torch

from vprune.testbed import vlm as V
from vprune.testbed.vqa import ANSWERS, QTYPES, VQAGenerator, chance, make_dataset, render, text_prior

# The shipped model answers 82.1% of 1000 TEST_SEED questions (vlm_train.json; chance 36.5%); the bars
# below sit under it so that a broken loader, tokenizer or transformers upgrade fails, not sampling noise.
RECORD_BAR = 0.80
ACCURACY_BAR = 0.72
N_CHECK = 200


@pytest.fixture(scope="module")
def model_tok():
    torch.set_num_threads(1)
    return V.load_vlm()


def test_generator_is_deterministic_and_seeded():
    a, b, c = make_dataset(6, seed=3), make_dataset(6, seed=3), make_dataset(6, seed=4)
    assert [s.question for s in a] == [s.question for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [s.question for s in a] != [s.question for s in c]
    img = a[0].image
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert np.array_equal(render(a[0].objects, texture_seed=1), render(a[0].objects, texture_seed=1))


def test_answers_are_valid_single_words_and_objects_on_the_patch_grid():
    gen = VQAGenerator(seed=5)
    for t in QTYPES:
        s = gen.sample(t)
        assert s.qtype == t and s.answer in ANSWERS[t] and " " not in s.answer
        for o in s.objects:
            assert (o.x - o.size // 2) % 8 == 0 and (o.y - o.size // 2) % 8 == 0


def test_questions_need_the_image():
    """The best text-only guess (most frequent answer per question string) stays near chance."""
    prior = text_prior(make_dataset(800, seed=11), make_dataset(200, seed=12))
    assert prior < chance() + 0.1, (prior, chance())


def test_tokenizer_and_config_agree(model_tok):
    model, tok = model_tok
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert tok.vocab[tok.image_token_id] == "<image>"
    assert model.config.image_token_id == tok.image_token_id
    assert model.config.image_seq_length == tok.image_seq_length == 64
    assert model.config.text_config.vocab_size == len(tok)
    ids = tok.prompt("what color is the circle ?")
    assert ids.count(tok.image_token_id) == 64 and ids[0] == tok.bos_token_id
    assert tok.decode(tok.encode("what color is the circle ?")) == "what color is the circle ?"
    for words in ANSWERS.values():
        assert all(w in tok.ids for w in words)


def test_loader_maps_older_state_dict_layouts(model_tok):
    """Weights saved with transformers 4.4x key names (language_model.model.*, vision_model.*) load too."""
    model, _ = model_tok
    old = {}
    for k, v in model.state_dict().items():
        k = k.replace("model.vision_tower.", "vision_tower.vision_model.")
        k = k.replace("model.language_model.", "language_model.model.").replace("model.multi_modal_projector.",
                                                                                 "multi_modal_projector.")
        k = k.replace("lm_head.", "language_model.lm_head.")
        old[k] = v
    fresh = V.build_vlm(V.read_config())
    V.load_state_dict_any_layout(fresh, old)
    for (ka, a), (kb, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert ka == kb and torch.equal(a, b)


def test_unpruned_accuracy_and_image_dependence(model_tok):
    from vprune.testbed.train_vlm import TEST_SEED

    model, tok = model_tok
    samples = make_dataset(N_CHECK, seed=TEST_SEED)
    acc = V.accuracy(V.answer(model, tok, samples, batch_size=100), samples)
    assert acc >= ACCURACY_BAR, acc
    blank = np.full_like(samples[0].image, 128)
    blind = V.accuracy(V.answer(model, tok, samples, batch_size=100, images=[blank] * N_CHECK), samples)
    assert blind < chance() + 0.1 and blind < acc - 0.1, (blind, acc)


def test_shipped_training_record():
    with open(os.path.join(V.HERE, "vlm_train.json")) as f:
        rec = json.load(f)
    assert rec["accuracy"] >= RECORD_BAR
    assert rec["text_only_prior"] < chance() + 0.1
    assert {"command", "versions", "steps", "seed"} <= set(rec)


def test_pruning_the_testbed_vlm(model_tok):
    """The LLaVA integration on the trained testbed: keep=1.0 answers as unpatched; keep=0.25 keeps 16."""
    import vprune
    from vprune.evaluation.vlm import patch_for

    model, tok = model_tok
    samples = make_dataset(32, seed=21)
    base = V.answer(model, tok, samples, batch_size=32)
    for strategy in ("fastv", "dual-nh"):
        patch_for(model, strategy, 1.0, 2, 0)
        try:
            assert V.answer(model, tok, samples, batch_size=32) == base
        finally:
            vprune.unpatch(model)
        patch_for(model, strategy, 0.25, 2, 0)
        try:
            V.answer(model, tok, samples, batch_size=32)
            assert vprune.stats(model)["visual_tokens_after"] == [16] * 32
        finally:
            vprune.unpatch(model)
    assert V.answer(model, tok, samples, batch_size=32) == base


def test_training_batches_depend_only_on_seed_and_index():
    from vprune.testbed.train_vlm import batches, make_batch

    a, la = make_batch((7, 3, 4, 64, 8))
    b, lb = make_batch((7, 3, 4, 64, 8))
    c, _ = make_batch((7, 4, 4, 64, 8))
    assert [s.question for s in a] == [s.question for s in b] and np.array_equal(la, lb)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [s.question for s in a] != [s.question for s in c]
    assert la.shape == (4, 64) and la.max() <= 15
    stream = list(batches(7, 5, 4, 64, 8, workers=0))
    assert [s.question for s in stream[3][0]] == [s.question for s in a]


def test_attention_probe_reports_object_coverage():
    from vprune.evaluation.vlm_probe import probe

    r = probe(layer=2, keep=16, questions=5)
    assert r["questions"] == 5
    for key in ("fastv_top_covers_object", "random_covers_object", "attention_mass_on_object"):
        assert 0.0 <= r[key] <= 1.0
    assert r["object_share_of_tokens"] == pytest.approx(4 / 64)
