"""`toy build`: a smoke run of the whole pipeline on a few steps, and seeded determinism of the training."""

import json

import torch
from safetensors.torch import load_file

from llava_token_reduction.cli import main
from llava_token_reduction.toy.scenes import TRAIN_SEED, make_split
from llava_token_reduction.toy.train import Recipe, train_clip, train_llava


TINY_RECIPE = Recipe(train_images=16, clip_steps=2, clip_batch=4, llava_steps=2, llava_batch=2)


def test_training_is_seeded_and_deterministic():
    train = make_split(TRAIN_SEED, TINY_RECIPE.train_images)
    first_clip, clip_losses = train_clip(TINY_RECIPE, progress=False)
    second_clip, clip_losses_again = train_clip(TINY_RECIPE, progress=False)
    assert clip_losses == clip_losses_again
    for (name, a), (_, b) in zip(first_clip.state_dict().items(), second_clip.state_dict().items()):
        assert torch.equal(a, b), name
    first, losses = train_llava(first_clip, train, TINY_RECIPE, progress=False)
    second, losses_again = train_llava(second_clip, train, TINY_RECIPE, progress=False)
    assert losses == losses_again
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    # the vision tower is the CLIP's and stays frozen; projector and language model moved
    assert torch.equal(first.model.vision_tower.embeddings.patch_embedding.weight,
                       first_clip.vision_model.embeddings.patch_embedding.weight)
    assert not first.model.vision_tower.embeddings.patch_embedding.weight.requires_grad


def test_build_command_smoke_run(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["toy", "build", str(out), "--quick", "--no-progress"]) == 0
    record = json.loads((out / "build.json").read_text())
    assert record["recipe"]["llava_steps"] == 3 and record["threads"] == 1
    for kind in ("clip", "llava", "visionzip", "trim", "prumerge"):
        weights = load_file(out / kind / "model.safetensors")
        assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}, kind
    assert json.loads((out / "visionzip" / "config.json").read_text())["model_type"] == "llava_visionzip"
    assert json.loads((out / "prumerge" / "config.json").read_text())["model_type"] == "llava_prumerge"
    assert set(record["clip_retrieval"]) == {"all", "scene", "mirror", "shape changed", "colour changed"}
    trim_config = json.loads((out / "trim" / "config.json").read_text())
    assert trim_config["model_type"] == "llava_trim" and trim_config["vision_config"]["image_size"] == 112
    # the TRIM checkpoint's vision tower is the CLIP's (convert verified it; check one tensor independently)
    clip = load_file(out / "clip" / "model.safetensors")
    trim = load_file(out / "trim" / "model.safetensors")
    (trim_key,) = [k for k in trim if "vision_tower" in k and k.endswith("embeddings.patch_embedding.weight")]
    assert torch.equal(clip["vision_model.embeddings.patch_embedding.weight"], trim[trim_key])


def test_clip_check_command_on_a_smoke_build(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["toy", "build", str(out), "--quick", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["toy", "clip-check", "--models", str(out), "--groups", "3", "--probe-scenes", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("caption retrieval within 3 held-out groups of four (chance 25%): ")
    assert [line.split(":")[0].strip() for line in lines[1:5]] == ["scene", "mirror", "shape changed", "colour changed"]
    assert "shape" in lines[5] and "colour" in lines[5] and "centre patch" in lines[6]
    assert main(["toy", "clip-check", "--models", str(tmp_path / "nothing")]) != 0
    assert "no CLIP checkpoint in" in capsys.readouterr().err
    assert main(["toy", "clip-check", "--models", str(out), "--groups", "0"]) != 0
    assert "--groups must be >= 1" in capsys.readouterr().err


def test_linear_probe_tells_separable_classes_and_not_random_labels():
    """The probe itself, on data whose answer is known: classes that one feature separates are found (99% of
    200, with 19 noise features to overfit), labels drawn independently of the features are not (about a
    third of three classes)."""
    from llava_token_reduction.toy.probe import linear_probe

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=generator)
    features = torch.randn(600, 20, generator=generator)
    separable = features.clone()
    separable[:, 7] = labels * 5.0
    assert linear_probe(separable[:400], labels[:400], separable[400:], labels[400:], 3) >= 0.95
    shuffled = torch.randint(0, 3, (600,), generator=generator)
    assert linear_probe(features[:400], shuffled[:400], features[400:], shuffled[400:], 3) < 0.45


def test_cached_tower_features_give_the_model_s_own_loss():
    """Stage 2 runs the frozen tower once per image and trains on its cached output (`llava_loss`); the loss
    and the projector's gradient must be what `LlavaForConditionalGeneration.forward` gives from the pixels."""
    from transformers import CLIPModel

    from llava_token_reduction.toy.train import (
        build_clip,
        build_llava,
        build_toy_processor,
        llava_loss,
        qa_batch,
        tower_features,
    )

    torch.manual_seed(0)
    clip: CLIPModel = build_clip()
    model = build_llava(clip).eval()
    processor = build_toy_processor()
    train = make_split(TRAIN_SEED, 3, questions_per_image=2)
    images = {i: scene.render() for i, scene in enumerate(train.scenes)}
    questions = list(train.questions)
    reference = model(**qa_batch(processor, questions, images))
    reference.loss.backward()
    reference_grad = model.model.multi_modal_projector.linear_1.weight.grad.clone()
    model.zero_grad()
    features = tower_features(model, processor, train.scenes, progress=False)
    assert features.shape == (3, 16, 64)
    batch = qa_batch(processor, questions)
    assert torch.equal(batch["input_ids"], qa_batch(processor, questions, images)["input_ids"])
    loss = llava_loss(model, batch, features[[q.image_index for q in questions]])
    loss.backward()
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.model.multi_modal_projector.linear_1.weight.grad, reference_grad,
                               rtol=1e-4, atol=1e-7)
    # The placeholders' features as one (tokens, width) run, as the background-drop examples pass them: the same.
    flat = features[[q.image_index for q in questions]].flatten(0, 1)
    torch.testing.assert_close(llava_loss(model, batch, flat), loss, rtol=0, atol=0)


def test_background_drop_keeps_every_object_patch_and_a_uniform_share_of_the_rest():
    from llava_token_reduction.toy.train import build_toy_processor, kept_patches, qa_batch, scene_object_patches

    train = make_split(TRAIN_SEED, 50)
    objects = scene_object_patches(train.scenes)
    assert all(1 < len(patches) < 5 for patches in objects)  # 2-4 objects, one patch each
    generator = torch.Generator().manual_seed(0)
    assert all(kept_patches(generator, objects[0], 16, 0.0) == list(range(16)) for _ in range(20))
    counts = []
    for index in range(400):
        kept = kept_patches(generator, objects[index % 50], 16, 1.0)
        assert kept == sorted(set(kept)) and objects[index % 50] <= set(kept) <= set(range(16))
        counts.append(len(kept) - len(objects[index % 50]))
    assert min(counts) == 0 and max(counts) >= 11 and 4 < sum(counts) / len(counts) < 9  # 0 to all, about half
    shown = sum(kept_patches(generator, objects[0], 16, 0.5) == list(range(16)) for _ in range(400))
    assert 150 < shown < 260  # half the examples whole (and a few where every background patch was drawn)
    # a batch of such examples: as many placeholders as patches kept, the rest padding
    processor = build_toy_processor()
    questions = list(train.questions[:3])
    batch = qa_batch(processor, questions, image_tokens=[3, 16, 7])
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_token).sum(dim=1).tolist() == [3, 16, 7]


def test_toy_tokenizer_has_one_token_per_task_word():
    from llava_token_reduction.toy.scenes import COLORS, NUMBER_WORDS, SHAPES
    from llava_token_reduction.toy.train import build_toy_processor, prompt_text, qa_batch

    processor = build_toy_processor()
    tokenizer = processor.tokenizer
    for word in (*COLORS, *SHAPES, *NUMBER_WORDS.values(), "yes", "no", "left", "right"):
        (token,) = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode([token, tokenizer.eos_token_id], skip_special_tokens=True) == word
    train = make_split(TRAIN_SEED, 40, questions_per_image=5)
    for question in train.questions:
        ids = tokenizer(prompt_text(processor, question.text))["input_ids"]
        assert tokenizer.unk_token_id not in ids, question.text
    assert tokenizer("What is a zebra?", add_special_tokens=False)["input_ids"].count(tokenizer.unk_token_id) == 1
    # the fixed training length holds the longest prompt + answer without truncation
    batch = qa_batch(processor, list(train.questions))
    assert batch["input_ids"].shape[1] == 16 + 20 and (batch["attention_mask"][:, 0] == 0).any()
