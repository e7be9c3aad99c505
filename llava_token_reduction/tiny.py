"""Small LLaVA models, tokenizers and processors built offline from configs, with random weights.

Used by the `demo` command when no checkpoint is given and by the test suite: nothing here touches the
network. The shapes follow LLaVA-1.5 (CLIP ViT vision tower, two-layer GELU projector, Llama language
model), only narrower and shallower.
"""

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)


IMAGE_TOKEN = "<image>"
# The 256 printable stand-ins byte-level tokenizers use for raw bytes, in a fixed order.
BYTE_ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"): images of a turn first, then its text.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'] | upper }}{{ ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{{ ' ' }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{{ ' ' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyShape:
    """Widths and depths of a small LLaVA. `image_size // patch_size` squared is the patch count."""

    image_size: int = 56
    patch_size: int = 7
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    projection_dim: int = 16
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    clip_text_hidden: int = 32
    clip_text_layers: int = 2
    # Wider than transformers' default 0.02 so that a random language model's next token depends on its
    # input: tests that compare generated tokens could not fail otherwise.
    text_initializer_range: float = 0.3

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


TEST_SHAPE = TinyShape()
# Big enough that the demo's timings mean something (576 patches as in LLaVA-1.5), small enough for a CPU.
DEMO_SHAPE = TinyShape(
    image_size=336, patch_size=14, vision_hidden=128, vision_layers=6, vision_heads=4, projection_dim=64,
    text_hidden=256, text_layers=4, text_heads=8, text_kv_heads=8, clip_text_hidden=64, clip_text_layers=2,
)


def build_llm_tokenizer(with_image_token: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) with Llama's special tokens and `<image>`.
    Decoding is exact, so prompts round-trip through encode/decode. `with_image_token=False` leaves `<image>`
    out, like the tokenizers of original LLaVA-codebase checkpoints."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + ([IMAGE_TOKEN] if with_image_token else [])
    vocab = {token: index for index, token in enumerate(specials)}
    for character in BYTE_ALPHABET:
        vocab[character] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN} if with_image_token else {}, padding_side="left",
    )
    return tokenizer


def build_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer with a byte-level vocabulary (every byte, with and without `</w>`) and no merges:
    the real tokenizer's behaviour (lower-casing, BOS/EOS, 77-token limit) at a fraction of the size."""
    vocab = {}
    for character in BYTE_ALPHABET:
        vocab[character] = len(vocab)
    for character in BYTE_ALPHABET:
        vocab[character + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_image_processor(shape: TinyShape = TEST_SHAPE) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size}
    )


def build_processor(shape: TinyShape = TEST_SHAPE) -> LlavaProcessor:
    """A stock `LlavaProcessor`: one `<image>` expands to `patches` placeholders (CLS dropped, as llava-hf)."""
    return LlavaProcessor(
        image_processor=build_image_processor(shape), tokenizer=build_llm_tokenizer(), patch_size=shape.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_trim_processor(shape: TinyShape = TEST_SHAPE):
    """A `LlavaTrimProcessor`: the stock LLaVA processor of `shape` plus the tiny CLIP tokenizer."""
    from .modeling.processing_llava_trim import LlavaTrimProcessor

    return LlavaTrimProcessor(
        image_processor=build_image_processor(shape), tokenizer=build_llm_tokenizer(),
        clip_tokenizer=build_clip_tokenizer(), patch_size=shape.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )


def llava_config_kwargs(shape: TinyShape = TEST_SHAPE, tokenizer=None) -> dict:
    """Keyword arguments of a `LlavaConfig` (or one of ours) for a small model of `shape`."""
    tokenizer = tokenizer or build_llm_tokenizer()
    vision_config = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=shape.projection_dim,
    )
    text_config = LlamaConfig(
        hidden_size=shape.text_hidden, intermediate_size=3 * shape.text_hidden, num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads, num_key_value_heads=shape.text_kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=shape.text_initializer_range,
    )
    return dict(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=shape.patches,
        pad_token_id=tokenizer.pad_token_id,
    )


def clip_text_config(shape: TinyShape = TEST_SHAPE, clip_tokenizer=None) -> CLIPTextConfig:
    clip_tokenizer = clip_tokenizer or build_clip_tokenizer()
    return CLIPTextConfig(
        hidden_size=shape.clip_text_hidden, intermediate_size=4 * shape.clip_text_hidden,
        num_hidden_layers=shape.clip_text_layers, num_attention_heads=4, projection_dim=shape.projection_dim,
        vocab_size=len(clip_tokenizer), max_position_embeddings=77,
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )


def trim_config_kwargs(shape: TinyShape = TEST_SHAPE, tokenizer=None, clip_tokenizer=None) -> dict:
    """Keyword arguments of a `LlavaTrimConfig` for a small model of `shape`: LLaVA's plus the CLIP text tower."""
    return dict(
        **llava_config_kwargs(shape, tokenizer=tokenizer),
        clip_text_config=clip_text_config(shape, clip_tokenizer), projection_dim=shape.projection_dim,
    )


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def method_config_kwargs(method, shape: TinyShape = TEST_SHAPE, tokenizer=None, clip_tokenizer=None) -> dict:
    """Keyword arguments of `method`'s config (a `methods.ReductionMethod` or its name) for a small model of
    `shape`: LLaVA's, plus CLIP's text tower when the method needs one."""
    from .methods import get

    method = get(method) if isinstance(method, str) else method
    if method.needs_clip_text_tower:
        return trim_config_kwargs(shape, tokenizer=tokenizer, clip_tokenizer=clip_tokenizer)
    return llava_config_kwargs(shape, tokenizer=tokenizer)


def build_method_processor(method, shape: TinyShape = TEST_SHAPE):
    """The processor `method`'s checkpoints carry (`processor_class`), on the tiny tokenizers of `shape`."""
    from .methods import get

    method = get(method) if isinstance(method, str) else method
    extra = {"clip_tokenizer": build_clip_tokenizer()} if method.needs_clip_text_tower else {}
    return method.processor_class(
        image_processor=build_image_processor(shape), tokenizer=build_llm_tokenizer(), patch_size=shape.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
        **extra,
    )


def build_method_model(method, shape: TinyShape = TEST_SHAPE, processor=None, seed: int | None = None, **fields):
    """A random-weight `method` model (`generation_class`, eval mode) of `shape`, matching `processor`'s
    tokenizers when given (else new tiny ones), its config's values replaced by `fields`."""
    from .methods import get

    method = get(method) if isinstance(method, str) else method
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = method_config_kwargs(method, shape, tokenizer=getattr(processor, "tokenizer", None),
                                  clip_tokenizer=getattr(processor, "clip_tokenizer", None))
    return method.generation_class(method.config_class(**kwargs, **fields)).eval()
