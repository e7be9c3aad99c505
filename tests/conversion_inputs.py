"""Synthetic converter inputs in every format, built offline by the conversion tests.

- `save_stock(directory, shape)`: a stock `LlavaForConditionalGeneration` (`save_pretrained`) with its processor.
- `save_clip(directory, vision_state, shape)`: a transformers `CLIPModel` checkpoint whose vision tower holds
  `vision_state` (so it matches a LLaVA's tower), with a tiny CLIP tokenizer and image processor.
- `save_original(directory, stock_model, ...)`: the LLaVA codebase's layout (`llava_llama`), written by hand:
  safetensors (optionally sharded with an index) or `pytorch_model.bin`, config.json with `mm_*` fields, and a
  tokenizer without `<image>`; optionally with the vision tower and, as the released TRIM checkpoints, CLIP's
  text tower and projections.
- `save_projector_bin` / `save_projector_safetensors`: projector-only files in both naming schemes.
- `save_sentencepiece_tokenizer(directory)`: the tokenizer files of `liuhaotian/llava-v1.5-7b` as published (a
  Llama sentencepiece `tokenizer.model` only: BPE with byte fallback, `<unk>`/`<s>`/`</s>` at ids 0-2, the 256
  byte pieces from id 3 so that `\\n` is id 13; its tokenizer_config.json with `padding_side: "right"`,
  `model_max_length: 2048` and no `legacy` field), trained offline on a few sentences.
"""

import io
import json
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, LlavaConfig, LlavaForConditionalGeneration

from llava_token_reduction.tiny import (
    TEST_SHAPE,
    build_clip_tokenizer,
    build_image_processor,
    build_llm_tokenizer,
    build_processor,
    clip_text_config,
    llava_config_kwargs,
)


def stock_model(shape=TEST_SHAPE, seed: int = 0, tokenizer=None) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    tokenizer = tokenizer or build_llm_tokenizer()
    return LlavaForConditionalGeneration(LlavaConfig(**llava_config_kwargs(shape, tokenizer=tokenizer))).eval()


def save_stock(directory, shape=TEST_SHAPE, seed: int = 0) -> LlavaForConditionalGeneration:
    processor = build_processor(shape)
    model = stock_model(shape, seed, processor.tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model


def vision_state_of(model) -> dict:
    """`model.vision_tower.*` tensors of a LLaVA model, without the prefix (a CLIP vision transformer's names)."""
    prefix = "model.vision_tower."
    return {k[len(prefix):]: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def clip_model(vision_state=None, shape=TEST_SHAPE, seed: int = 5) -> CLIPModel:
    torch.manual_seed(seed)
    vision_config = llava_config_kwargs(shape)["vision_config"]
    text_config = clip_text_config(shape)
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                        projection_dim=shape.projection_dim)
    model = CLIPModel(config).eval()
    if vision_state is not None:
        missing, unexpected = model.vision_model.load_state_dict(vision_state, strict=True)
        assert not missing and not unexpected
    return model


def save_clip(directory, vision_state=None, shape=TEST_SHAPE, seed: int = 5) -> CLIPModel:
    model = clip_model(vision_state, shape, seed)
    model.save_pretrained(directory)
    build_clip_tokenizer().save_pretrained(directory)
    build_image_processor(shape).save_pretrained(directory)
    return model


# In-memory LLaVA names -> LLaVA-codebase names (an independent spelling of what the converter undoes).
_TO_ORIGINAL = (
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
)


def original_state(model, *, with_vision: bool, clip: CLIPModel | None = None) -> dict:
    state = {}
    for key, value in model.state_dict().items():
        for source, target in _TO_ORIGINAL:
            if key.startswith(source):
                if source == "model.vision_tower." and not with_vision:
                    break
                state[target + key[len(source):]] = value.clone()
                break
        else:
            raise AssertionError(f"unexpected key {key}")
    if clip is not None:
        for key, value in clip.state_dict().items():
            if key.startswith("text_model."):
                state["model.vision_tower.text_tower." + key] = value.clone()
            elif key == "text_projection.weight":
                state["model.vision_tower.text_tower.text_projection.weight"] = value.clone()
            elif key == "visual_projection.weight":
                state["model.vision_tower.vision_tower.visual_projection.weight"] = value.clone()
    return state


def original_config(model, *, vision_tower: str, reduce_func: str | None = None, dtype: str = "float32") -> dict:
    text = model.config.text_config
    config = {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings,
        "max_length": 4096,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "vocab_size": text.vocab_size,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype,
        "transformers_version": "4.37.2",
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    if reduce_func is not None:
        config["mm_vision_token_reduce_func"] = reduce_func
    return config


_SENTENCES = [
    "USER: What is shown in this image? ASSISTANT: A cat sitting on a red chair next to the window.",
    "Describe the picture in detail. There are two dogs playing in the park with a ball.",
    "What color is the car? The car is blue and parked near the house on the street.",
    "How many people are in the photo? 12 people stand in a line at 3 pm.",
]


def _special(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def sentencepiece_model_bytes() -> bytes:
    """A small Llama-style sentencepiece model (the trainer options Llama's tokenizer.model records)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 50), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    return model.getvalue()


def save_sentencepiece_tokenizer(directory) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as handle:
        handle.write(sentencepiece_model_bytes())
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _special("<s>"),
        "clean_up_tokenization_spaces": False, "eos_token": _special("</s>"), "model_max_length": 2048,
        "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": _special("<unk>"),
    }
    special = {name: {k: v for k, v in _special(content).items() if k != "__type"}
               for name, content in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    special["pad_token"] = "<unk>"
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(directory, name), "w") as handle:
            json.dump(data, handle, indent=2)


def save_original(
    directory,
    *,
    vision_tower: str,
    with_vision: bool = False,
    clip: CLIPModel | None = None,
    reduce_func: str | None = None,
    dtype: torch.dtype = torch.float32,
    weights: str = "safetensors",
    shape=TEST_SHAPE,
    seed: int = 0,
    config_overrides: dict | None = None,
    sentencepiece_tokenizer: bool = False,
):
    """Write an original-format checkpoint made from a stock model (built on a tokenizer without `<image>`).
    Returns `(stock_model, state)`: the model it was made from and the tensors as written."""
    os.makedirs(directory, exist_ok=True)
    if sentencepiece_tokenizer:
        from transformers import AutoTokenizer

        save_sentencepiece_tokenizer(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    else:
        tokenizer = build_llm_tokenizer(with_image_token=False)
    model = stock_model(shape, seed, tokenizer)
    state = {k: v.to(dtype) for k, v in original_state(model, with_vision=with_vision, clip=clip).items()}
    if weights == "bin":
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    elif weights == "sharded":
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        weight_map = {}
        for name, names in halves.items():
            save_file({k: state[k].contiguous() for k in names}, os.path.join(directory, name),
                      metadata={"format": "pt"})
            weight_map.update({k: name for k in names})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"),
                  metadata={"format": "pt"})
    config = original_config(model, vision_tower=vision_tower, reduce_func=reduce_func,
                             dtype=str(dtype).replace("torch.", ""))
    config.update(config_overrides or {})
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    if not sentencepiece_tokenizer:
        tokenizer.save_pretrained(directory)
    return model, state


def projector_tensors(seed: int = 7, shape=TEST_SHAPE) -> dict:
    generator = torch.Generator().manual_seed(seed)
    vision, text = shape.vision_hidden, shape.text_hidden
    return {
        "linear_1.weight": torch.randn(text, vision, generator=generator),
        "linear_1.bias": torch.randn(text, generator=generator),
        "linear_2.weight": torch.randn(text, text, generator=generator),
        "linear_2.bias": torch.randn(text, generator=generator),
    }


def save_projector_bin(path, tensors: dict) -> None:
    """The LLaVA codebase's `mm_projector.bin`: a torch.save dict with `model.mm_projector.{0,2}.*` names."""
    names = {"linear_1": "model.mm_projector.0", "linear_2": "model.mm_projector.2"}
    torch.save({f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in tensors.items()}, path)


def save_projector_safetensors(path, tensors: dict) -> None:
    """transformers' names: `multi_modal_projector.linear_{1,2}.*`."""
    save_file({f"multi_modal_projector.{k}": v.contiguous() for k, v in tensors.items()}, path)


def add_to_hub_cache(cache, repo_id: str, directory, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """Copy a checkpoint directory into `cache` as the hub cache lays out a downloaded repository
    (`models--owner--name/snapshots/<rev>/` and `refs/main`), so that hub ids resolve with HF_HUB_OFFLINE=1."""
    import shutil

    repo = os.path.join(str(cache), "models--" + repo_id.replace("/", "--"))
    shutil.copytree(directory, os.path.join(repo, "snapshots", revision))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as handle:
        handle.write(revision)


def generation_config_as_published(directory) -> None:
    """liuhaotian/llava-v1.5-7b's generation_config.json (LLaVA-codebase saves carry the context size)."""
    with open(os.path.join(directory, "generation_config.json"), "w") as handle:
        json.dump({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "max_length": 4096,
                   "pad_token_id": 0, "transformers_version": "4.31.0"}, handle, indent=2)
