"""The zoo's tiny base: a real ``Qwen2VLForConditionalGeneration`` with its own tokenizer and processor.

Everything saved here is a standard Hugging Face checkpoint directory, loadable with plain
``from_pretrained`` (model, ``AutoTokenizer``, ``Qwen2VLImageProcessorPil``), laid out like
``Qwen/Qwen2-VL-7B-Instruct`` at toy size (ZOO_NOTES.md):

- model: text hidden 128, 2 layers, 4 heads (2 KV heads), vision embed 64, depth 2; 112×112 images give
  8×8 patches of 14 px, merged 2×2 into 16 image tokens;
- tokenizer: a word-level vocabulary built from the tasks' words (:func:`tasks.vocabulary_text`).
  Pre-tokenisation splits words (with their leading space), single digits, single punctuation marks and
  whitespace, so decoding (a plain concatenation) gives back the text exactly: ``(125,340),(380,610)``
  survives a round trip, which the grounding metric needs. Qwen2-VL's special tokens and chat template;
- image processor: ``min_pixels = max_pixels = 112*112`` so every image becomes exactly 16 tokens;
- generation config: Qwen2-VL-Instruct's sampling settings, as the real checkpoints carry them
  (EVALUATION.md: the evaluator must decode greedily regardless).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnimerge.benchmarks.zoo.tasks import IMAGE_SIZE, vocabulary_text

__all__ = [
    "ZooModelSize",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "build_image_processor",
    "build_tiny_base",
    "save_tokenizer_and_processor",
]

logger = logging.getLogger(__name__)

# Qwen2-VL's special tokens, in Qwen's order (the real ids are 151643...151656; here they come first).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
UNK_TOKEN = "<|unk|>"

# Qwen2-VL-7B-Instruct's chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# One pre-token: a word with an optional leading space, one digit, one punctuation mark, or one whitespace.
PRETOKEN_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s"


@dataclass(frozen=True)
class ZooModelSize:
    """Sizes of the tiny Qwen2-VL (ZOO_NOTES.md, "What worked")."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_embed_dim: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vision_mlp_ratio: int = 4


def _vocabulary() -> list[str]:
    """Tokens in a fixed order: specials, unk, whitespace, then every digit/mark/word with and without a space."""
    text = vocabulary_text()
    words = sorted(set(re.findall(r"[A-Za-z]+", text)))
    marks = sorted(set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"))
    digits = [str(d) for d in range(10)]
    tokens = [*SPECIAL_TOKENS, UNK_TOKEN, "\n", " ", "\t"]
    for piece in digits + marks + words:
        tokens += [piece, " " + piece]
    return tokens


def build_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over the zoo's word-level vocabulary, with Qwen2-VL's special tokens.

    Returns:
        The tokenizer, chat template attached; ``pad_token`` is ``<|endoftext|>`` as in Qwen2-VL and
        ``padding_side`` is left (for batched generation).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor() -> Any:
    """Qwen2-VL's image processor (PIL backend) pinned to 112×112 images → 8×8 patches → 16 tokens."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)


def _model_config(tokenizer: Any, size: ZooModelSize) -> Any:
    from transformers import Qwen2VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    head_dim = size.hidden_size // size.num_attention_heads
    # M-RoPE sections (temporal, height, width) must sum to head_dim / 2; Qwen2-VL's ratio is 16:24:24.
    quarter = head_dim // 8
    mrope_section = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "max_position_embeddings": 4096,
        "max_window_layers": size.num_hidden_layers,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": size.vision_depth,
        "embed_dim": size.vision_embed_dim,
        "hidden_size": size.hidden_size,
        "num_heads": size.vision_heads,
        "mlp_ratio": size.vision_mlp_ratio,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _generation_config(tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    # Qwen2-VL-7B-Instruct's generation_config.json, ids translated to this vocabulary.
    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        do_sample=True,
        temperature=0.01,
        top_k=1,
        top_p=0.001,
        repetition_penalty=1.05,
    )


def save_tokenizer_and_processor(out_dir: str | Path, tokenizer: Any | None = None) -> None:
    """Writes the tokenizer files, chat template and ``preprocessor_config.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    tokenizer.save_pretrained(out_dir)
    build_image_processor().save_pretrained(out_dir)
    # Kept also as a plain file, as recent Qwen2-VL checkpoints do, for tools that read it directly.
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def build_tiny_base(out_dir: str | Path, seed: int = 0, *, size: ZooModelSize = ZooModelSize()) -> Path:
    """Saves a randomly initialised tiny Qwen2-VL with its tokenizer and processor as a HF checkpoint.

    Args:
        out_dir: directory to write (created; existing files of the same names are overwritten).
        seed: initialisation seed; the same seed gives byte-identical ``model.safetensors``.
        size: model sizes.

    Returns:
        ``out_dir`` as a ``Path``. It holds ``config.json``, ``model.safetensors``,
        ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``
        and ``preprocessor_config.json``.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(_model_config(tokenizer, size))
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out_dir)
    save_tokenizer_and_processor(out_dir, tokenizer)
    (out_dir / "zoo_model_size.json").write_text(json.dumps(asdict(size), indent=2) + "\n")
    logger.info("tiny Qwen2-VL base (%d parameters) written to %s", model.num_parameters(), out_dir)
    return out_dir
