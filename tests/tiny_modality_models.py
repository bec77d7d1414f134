"""Tiny real modality models that share one LLM, for the modality-merge tests (no tests here).

A tiny LLaMA (hidden 64, 2 layers, 4 heads / 2 KV, vocabulary 128) is the shared LLM of a tiny LLaVA (CLIP image
tower) and a tiny Video-LLaVA (CLIP image and video towers); a tiny Qwen2 LLM of the same size is shared by a tiny
Qwen2-VL and a tiny Qwen2-Audio (Whisper-style encoder). Each modality model is built from its ``transformers``
config, its LLM weights are copied from the shared LLM checkpoint, its encoder and connector are random (seeded),
and it is saved with ``save_pretrained`` — so the files carry the names ``transformers`` 5 really writes. Every
model also gets a word-level tokenizer, its family's processor files and a chat template, so the evaluator can
run it: CLIP image processor (LLaVA, Video-LLaVA), Qwen2-VL image processor pinned to 56×56 pixels (4 image
tokens), Whisper feature extractor with 16 mel bins and 1 s windows (≤ 100 frames → ≤ 25 audio tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["TEXT", "build_llama_llm", "build_llava_on", "build_video_llava_on", "build_qwen2_llm",
           "build_qwen2vl_on", "build_qwen2audio_on", "make_lora", "IMAGE_TOKEN_ID", "VIDEO_TOKEN_ID",
           "AUDIO_TOKEN_ID", "AUDIO_SAMPLING_RATE"]

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=14, projection_dim=32)
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, AUDIO_TOKEN_ID = 120, 121, 122
VISION_START_ID, VISION_END_ID, AUDIO_BOS_ID, AUDIO_EOS_ID = 123, 124, 125, 126
AUDIO_SAMPLING_RATE = 16000
_SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|pad|>", "<unk>"]  # ids 0-3: bos, eos, pad, unk as in TEXT
_WORDS = ("USER ASSISTANT : ? . , what colour is the circle how many there a red square in top left of image shape "
          "which bar tallest number written blue green yellow 0 1 2 3 4 5 6 7 8 9 yes no one two three sound video "
          "answer question using single word or phrase "
          # appended later (earlier ids unchanged): the synthetic video / audio tasks' words
          "high low tone pitch beeps hear do you does appears move moves direction right up down").split()
# Qwen2-Audio's own default chat template (transformers' Qwen2AudioProcessor.default_chat_template).
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != "
    "'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' in content or "
    "message['type'] == 'audio' or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }} : "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'video' %}<video> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _save(model: Any, out_dir: Path, max_shard_size: str | int) -> Path:
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, max_new_tokens=8)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir


def _copy_llm(model: Any, llm_dir: Path) -> None:
    """Load the shared LLM's weights (causal-LM names) into a multimodal model's language model and head."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(llm_dir.glob("*.safetensors")):
        state.update(load_file(f))
    inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.model.language_model.load_state_dict(inner, strict=True)
    assert not missing and not unexpected  # test helper: a wrong shared config is a bug here
    with torch.no_grad():
        model.lm_head.weight.copy_(state["lm_head.weight"])


def build_llama_llm(out_dir: Path | str, *, seed: int = 0, max_shard_size: str | int = "40KB") -> Path:
    """The shared LLM: a tiny ``LlamaForCausalLM`` (untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    model = LlamaForCausalLM(LlamaConfig(**TEXT, tie_word_embeddings=False)).eval()
    return _save(model, Path(out_dir), max_shard_size)


def build_qwen2_llm(out_dir: Path | str, *, seed: int = 0, max_shard_size: str | int = "40KB") -> Path:
    """The shared Qwen2 LLM: a tiny ``Qwen2ForCausalLM`` (untied head, q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _seeded(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TEXT, tie_word_embeddings=False)).eval()
    return _save(model, Path(out_dir), max_shard_size)


def _tokenizer() -> Any:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _WORDS)}
    assert len(vocab) <= IMAGE_TOKEN_ID
    vocab.update({"<image>": IMAGE_TOKEN_ID, "<video>": VIDEO_TOKEN_ID, "<audio>": AUDIO_TOKEN_ID})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.add_special_tokens([AddedToken(t, special=True) for t in ("<image>", "<video>", "<audio>", *_SPECIALS)])
    from tokenizers import decoders

    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>",
                                                                           "video_token": "<video>"})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _qwen_tokenizer(chat_template: str) -> Any:
    """A word-level tokenizer with Qwen2-VL's and Qwen2-Audio's special tokens at ids 120-127."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_QWEN_SPECIALS + _WORDS)}
    assert len(vocab) <= IMAGE_TOKEN_ID
    added = {"<|image_pad|>": IMAGE_TOKEN_ID, "<|video_pad|>": VIDEO_TOKEN_ID, "<|AUDIO|>": AUDIO_TOKEN_ID,
             "<|vision_start|>": VISION_START_ID, "<|vision_end|>": VISION_END_ID, "<|audio_bos|>": AUDIO_BOS_ID,
             "<|audio_eos|>": AUDIO_EOS_ID, "<|im_start|>": 127}
    vocab.update(added)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.add_special_tokens([AddedToken(t, special=True) for t in (*added, *_QWEN_SPECIALS)])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def _image_processor(cls_name: str = "CLIPImageProcessorPil") -> Any:
    import transformers

    cls = getattr(transformers, cls_name)
    return cls(size={"shortest_edge": VISION["image_size"]},
               crop_size={"height": VISION["image_size"], "width": VISION["image_size"]})


def _save_processor(out_dir: Path, video: bool) -> None:
    """Tokenizer, image processor, chat template and ``processor_config.json``. ``VideoLlavaProcessor`` cannot be
    constructed without torchvision (its video processor), so its processor config is written as data; the
    evaluator then builds it without a video processor."""
    import json

    from transformers import LlavaProcessor

    tok = _tokenizer()
    settings = {"patch_size": VISION["patch_size"], "vision_feature_select_strategy": "default",
                "num_additional_image_tokens": 1}
    if video:
        tok.save_pretrained(out_dir)
        _image_processor().save_pretrained(out_dir)
        doc = {"processor_class": "VideoLlavaProcessor", "image_token": "<image>", "video_token": "<video>", **settings}
        (out_dir / "processor_config.json").write_text(json.dumps(doc, indent=2) + "\n")
    else:
        LlavaProcessor(image_processor=_image_processor(), tokenizer=tok, chat_template=CHAT_TEMPLATE,
                       **settings).save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def build_llava_on(llm_dir: Path | str, out_dir: Path | str, *, seed: int = 1, max_shard_size: str | int = "40KB",
                   with_processor: bool = True) -> Path:
    """A tiny ``LlavaForConditionalGeneration`` whose LLM is ``llm_dir``'s (CLIP tower and projector random)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    _seeded(seed)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                         image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(config).eval()
    _copy_llm(model, Path(llm_dir))
    out = _save(model, Path(out_dir), max_shard_size)
    if with_processor:
        _save_processor(out, video=False)
    return out


def build_video_llava_on(llm_dir: Path | str, out_dir: Path | str, *, seed: int = 2, max_shard_size: str | int = "40KB",
                         with_processor: bool = True) -> Path:
    """A tiny ``VideoLlavaForConditionalGeneration`` whose LLM is ``llm_dir``'s (image/video towers random)."""
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    _seeded(seed)
    config = VideoLlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                              image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
                              tie_word_embeddings=False)
    model = VideoLlavaForConditionalGeneration(config).eval()
    _copy_llm(model, Path(llm_dir))
    out = _save(model, Path(out_dir), max_shard_size)
    if with_processor:
        _save_processor(out, video=True)
    return out


def build_qwen2vl_on(llm_dir: Path | str, out_dir: Path | str, *, seed: int = 3, max_shard_size: str | int = "40KB",
                     with_processor: bool = True) -> Path:
    """A tiny ``Qwen2VLForConditionalGeneration`` whose text model is ``llm_dir``'s Qwen2 (vision tower random).

    Its processor files are the tokenizer, Qwen2-VL's image processor (56×56 pixels) and Qwen2-VL's chat template;
    ``Qwen2VLProcessor`` itself needs torchvision, so the evaluator builds it from these without a video processor.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    config = Qwen2VLConfig(text_config=text, vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64,
                                                            "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                                                            "spatial_merge_size": 2, "temporal_patch_size": 2},
                           image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                           vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
                           tie_word_embeddings=False)
    _seeded(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    _copy_llm(model, Path(llm_dir))
    out = _save(model, Path(out_dir), max_shard_size)
    if with_processor:
        from omnimerge.benchmarks.zoo.modeling import CHAT_TEMPLATE as QWEN2_VL_CHAT_TEMPLATE
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        _qwen_tokenizer(QWEN2_VL_CHAT_TEMPLATE).save_pretrained(out)
        Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(out)
        (out / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    return out


def build_qwen2audio_on(llm_dir: Path | str, out_dir: Path | str, *, seed: int = 4, max_shard_size: str | int = "40KB",
                        with_processor: bool = True) -> Path:
    """A tiny ``Qwen2AudioForConditionalGeneration`` whose LLM is ``llm_dir``'s Qwen2 (audio encoder random:
    16 mel bins, 2 layers, d_model 32, 50 positions → 25 audio tokens for 100 frames), with a real
    ``Qwen2AudioProcessor`` (Whisper feature extractor: 16 kHz, hop 160, 1 s windows → 100 frames)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration, Qwen2Config

    audio = Qwen2AudioEncoderConfig(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                                    d_model=32, max_source_positions=50)
    config = Qwen2AudioConfig(audio_config=audio, text_config=Qwen2Config(**TEXT, tie_word_embeddings=False),
                              audio_token_index=AUDIO_TOKEN_ID)
    _seeded(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    _copy_llm(model, Path(llm_dir))
    out = _save(model, Path(out_dir), max_shard_size)
    if with_processor:
        from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

        extractor = WhisperFeatureExtractor(feature_size=16, sampling_rate=AUDIO_SAMPLING_RATE, hop_length=160,
                                            chunk_length=1, n_fft=400)
        Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=_qwen_tokenizer(QWEN2_AUDIO_CHAT_TEMPLATE),
                            chat_template=QWEN2_AUDIO_CHAT_TEMPLATE).save_pretrained(out)
        (out / "chat_template.jinja").write_text(QWEN2_AUDIO_CHAT_TEMPLATE)
    return out


def make_lora(model_dir: Path | str, out_dir: Path | str, *, seed: int, r: int = 4, alpha: int = 8,
              target_modules: Sequence[str] = ("q_proj", "v_proj", "down_proj"),
              modules_to_save: Sequence[str] | None = ("multi_modal_projector",), layers_regex: str | None = None,
              init_scale: float = 0.1) -> Path:
    """A real PEFT LoRA adapter on the model at ``model_dir`` (its own class from ``config.json``), with random
    A and B (seeded per parameter name) and the connector in ``modules_to_save`` (perturbed too, so it differs
    from the model's). ``layers_regex`` (PEFT ``target_modules`` regex) restricts targets to the LLM."""
    import hashlib
    import json

    import transformers
    from peft import LoraConfig, get_peft_model

    model_dir = Path(model_dir)
    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=layers_regex if layers_regex else list(target_modules),
                        modules_to_save=list(modules_to_save) if modules_to_save else None)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "modules_to_save" in name:
                digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
                g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
                noise = init_scale * torch.randn(p.shape, generator=g)
                p.copy_(noise if "lora_" in name else p + noise)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
