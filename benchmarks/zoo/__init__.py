"""The tiny expert zoo: a miniature of the paper's benchmark that builds on CPU in minutes.

A tiny Qwen2-VL base, five experts (full fine-tunes and LoRA adapters) on synthetic renderings of the
paper's capabilities, and held-out evaluation sets in the layout the evaluator reads (ZOO_NOTES.md).
Modules: :mod:`tasks` (renderers), :mod:`modeling` (the base), :mod:`train`, :mod:`build`, :mod:`score`.
"""
