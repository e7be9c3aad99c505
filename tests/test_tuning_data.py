"""Projector tuning, data side: subsets, prompt encoding and labels, batching, and every bad-record case."""

import json

import pytest
import torch

from llava_token_reduction.tiny import TEST_SHAPE, build_processor
from llava_token_reduction.tuning.data import (
    IGNORE_INDEX,
    ConversationEncoder,
    DataError,
    InstructionCollator,
    InstructionDataset,
    load_samples,
    parse_record,
    select_subset,
)
from tuning_support import conversation, write_dataset


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def image_token_id(processor):
    return processor.tokenizer.convert_tokens_to_ids("<image>")


def make_encoder(processor, image_token_id, prompt_format="chat-template", max_length=2048):
    return ConversationEncoder(processor, TEST_SHAPE.patches, image_token_id, prompt_format, max_length)


# Subsets -------------------------------------------------------------------------------------------------------


def test_subset_is_reproducible_and_sized():
    first = select_subset(1000, 0.1, None, seed=3)
    assert len(first) == 100 and first == sorted(first) and len(set(first)) == 100
    assert select_subset(1000, 0.1, None, seed=3) == first
    assert select_subset(1000, 0.1, None, seed=4) != first
    assert set(select_subset(1000, 0.1, 30, seed=3)) <= set(first)  # --max-samples takes a prefix of the draw
    assert len(select_subset(1000, None, 30, seed=3)) == 30
    assert select_subset(5, None, None, seed=0) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="--fraction"):
        select_subset(10, 1.5, None, 0)


def test_load_samples_takes_the_same_subset_for_a_seed(tmp_path):
    data, folder = write_dataset(tmp_path, count=10)
    picks = [[s.record_id for s in load_samples(data, folder, fraction=0.5, seed=seed)[0]] for seed in (1, 1, 2)]
    assert picks[0] == picks[1] and len(picks[0]) == 5 and picks[0] != picks[2]
    assert len(load_samples(data, folder, fraction=0.5, max_samples=2, seed=1)[0]) == 2


# Encoding ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_format", ["chat-template", "llava-v1"])
def test_labels_cover_exactly_the_answers(processor, image_token_id, tmp_path, prompt_format):
    sample = parse_record(conversation("a", "red", second_turn=True), 0, tmp_path)
    encoder = make_encoder(processor, image_token_id, prompt_format)
    input_ids, labels = encoder.encode(sample)
    assert len(input_ids) == len(labels)
    assert input_ids.count(image_token_id) == TEST_SHAPE.patches
    assert all(label == IGNORE_INDEX for token, label in zip(input_ids, labels) if token == image_token_id)
    tokenizer = processor.tokenizer
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    assert runs == [" It is red.</s>", " Yes, red.</s>"]
    text = tokenizer.decode([t for t in input_ids if t != image_token_id])
    assert "What colour is this picture?" in text and "USER:" in text and "<image>" not in text
    if prompt_format == "llava-v1":
        assert text.startswith("<s>A chat between a curious human")


def test_trim_question_is_the_first_human_turn_without_the_marker(tmp_path):
    record = {"id": "q", "image": "x.png", "conversations": [
        {"from": "human", "value": "What is on the table?\n<image>"}, {"from": "gpt", "value": "A cup."},
        {"from": "human", "value": "And left of it?"}, {"from": "gpt", "value": "A pen."}]}
    sample = parse_record(record, 0, tmp_path)
    assert sample.questions == ["What is on the table?"]


def test_dataset_and_collator_pad_with_ignored_labels(processor, image_token_id, tmp_path):
    data, folder = write_dataset(tmp_path, count=2)
    samples, _ = load_samples(data, folder)
    dataset = InstructionDataset(samples, make_encoder(processor, image_token_id), processor)
    items = [dataset[0], dataset[1]]
    assert items[0]["pixel_values"].shape == (1, 3, TEST_SHAPE.image_size, TEST_SHAPE.image_size)
    batch = InstructionCollator(processor.tokenizer.pad_token_id)(items)
    short = min(range(2), key=lambda i: len(items[i]["input_ids"]))
    size = len(items[short]["input_ids"])
    assert batch["pixel_values"].shape[0] == 2
    assert (batch["labels"][short, size:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, size:] == 0).all() and batch["attention_mask"][short, :size].all()
    assert torch.equal(batch["input_ids"][short, :size], items[short]["input_ids"])


def test_dataset_takes_the_methods_side_inputs_from_its_processor(image_token_id, tmp_path):
    """TRIM's per-image rows (its registry `side_inputs`) are the CLIP tokenizer's encoding of each image's
    question, padded to CLIP's 77 positions; the pixels are the image processor's."""
    from llava_token_reduction import methods
    from llava_token_reduction.tiny import build_method_processor

    trim_processor = build_method_processor(methods.TRIM)
    data, folder = write_dataset(tmp_path, count=2)
    samples, _ = load_samples(data, folder)
    encoder = make_encoder(trim_processor, image_token_id)
    dataset = InstructionDataset(samples, encoder, trim_processor, side_inputs=methods.TRIM.side_inputs)
    item = dataset[1]
    assert set(item) == {"input_ids", "labels", "pixel_values", "clip_input_ids", "clip_attention_mask"}
    expected = trim_processor.clip_tokenizer(samples[1].questions, padding="max_length", max_length=77,
                                             truncation=True, return_tensors="pt")
    assert torch.equal(item["clip_input_ids"], expected["input_ids"])
    assert torch.equal(item["clip_attention_mask"], expected["attention_mask"])
    plain = InstructionDataset(samples, encoder, trim_processor)  # no side inputs: pixels only, the same pixels
    assert set(plain[1]) == {"input_ids", "labels", "pixel_values"}
    assert torch.equal(plain[1]["pixel_values"], item["pixel_values"])
    legacy = InstructionDataset(samples, encoder, trim_processor, trim=True)[1]
    assert torch.equal(legacy["clip_input_ids"], item["clip_input_ids"])


def test_dataset_refuses_a_processor_without_the_side_inputs(processor, image_token_id, tmp_path):
    data, folder = write_dataset(tmp_path, count=1)
    samples, _ = load_samples(data, folder)
    with pytest.raises(ValueError, match=r"the model takes clip_input_ids, clip_attention_mask per image, but its "
                                         r"processor LlavaProcessor does not make them"):
        InstructionDataset(samples, make_encoder(processor, image_token_id), processor,
                           side_inputs=("clip_input_ids", "clip_attention_mask"))


def test_too_long_record_is_reported(processor, image_token_id, tmp_path):
    data, folder = write_dataset(tmp_path, count=1)
    with pytest.raises(DataError, match=r"record 0, id sample0: too long"):
        load_samples(data, folder, encoder=make_encoder(processor, image_token_id, max_length=40))


# Bad records ---------------------------------------------------------------------------------------------------


def bad_case(tmp_path, case):
    """A dataset of two good records plus one bad one (index 2, id `bad`), in JSON Lines."""
    extra = conversation("bad", "red")
    if case == "missing image":
        extra["image"] = "images/nowhere.png"
    elif case == "unreadable image":
        (tmp_path / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / "broken.png").write_bytes(b"this is not a png")
        extra["image"] = "images/broken.png"
    elif case == "no image marker":
        extra["conversations"][0]["value"] = "What colour is this picture?"
    elif case == "empty conversation":
        extra["conversations"] = []
    data, folder = write_dataset(tmp_path, count=2, jsonl=True, extra_records=[extra])
    if case == "malformed json":
        lines = data.read_text().splitlines()
        lines[2] = lines[2][:-5]  # cut the end of the third record
        data.write_text("\n".join(lines) + "\n")
    return data, folder


BAD_CASES = {
    "missing image": "image file not found",
    "unreadable image": "unreadable image",
    "no image marker": "no <image> in the first human turn",
    "empty conversation": "empty conversation",
    "malformed json": "malformed JSON",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_is_named_or_skipped(tmp_path, case):
    data, folder = bad_case(tmp_path, case)
    with pytest.raises(DataError) as raised:
        load_samples(data, folder)
    message = str(raised.value)
    assert "record 2" in message and "id bad" in message and BAD_CASES[case] in message, message
    assert "--skip-bad-records" in message
    samples, bad = load_samples(data, folder, skip_bad_records=True)
    assert [s.record_id for s in samples] == ["sample0", "sample1"]
    assert [(b.index, b.record_id) for b in bad] == [(2, "bad")] and BAD_CASES[case] in bad[0].reason


def test_malformed_json_list_names_the_record(tmp_path):
    data, folder = write_dataset(tmp_path, count=3)
    text = json.dumps([conversation("r0", "red"), conversation("r1", "blue"), conversation("r2", "green")], indent=1)
    data.write_text(text.replace('"id": "r1",', '"id": "r1"', 1))  # missing comma inside record 1
    with pytest.raises(DataError, match=r"malformed JSON in record 1 \(id r1\) at line \d+ column \d+"):
        load_samples(data, folder, skip_bad_records=True)  # a broken JSON list cannot be skipped over


def test_all_bad_records_are_listed_before_anything_runs(tmp_path):
    extra = [dict(conversation("gone", "red"), image="images/gone.png"), {"id": "noturns", "conversations": []}]
    data, folder = write_dataset(tmp_path, count=1, extra_records=extra)
    with pytest.raises(DataError, match=r"2 bad record\(s\): record 1, id gone: .*; record 2, id noturns"):
        load_samples(data, folder)


def test_text_only_records_are_kept_or_dropped(tmp_path):
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    data, folder = write_dataset(tmp_path, count=1, extra_records=[text_only])
    assert [s.record_id for s in load_samples(data, folder)[0]] == ["sample0", "t"]
    assert [s.record_id for s in load_samples(data, folder, skip_text_only=True)[0]] == ["sample0"]


def test_a_chat_template_that_writes_the_eos_gets_one_eos_per_answer(image_token_id, tmp_path):
    processor = build_processor()
    processor.chat_template = (
        "{%- for m in messages -%}{{ m['role'] | upper }}{{ ': ' }}"
        "{%- for part in m['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
        "{%- for part in m['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
        "{%- if m['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ ' ' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    )
    sample = parse_record(conversation("a", "red", second_turn=True), 0, tmp_path)
    input_ids, labels = make_encoder(processor, image_token_id).encode(sample)
    eos = processor.tokenizer.eos_token_id
    assert input_ids.count(eos) == 2, processor.tokenizer.decode(input_ids)
    targets = processor.tokenizer.decode([label for label in labels if label != IGNORE_INDEX])
    assert targets.replace(" ", "") == "Itisred.</s>Yes,red.</s>"
