"""Key maps: how one architecture's LLM tensors align to the shared LLM namespace of a modality merge.

The shared namespace is a plain causal LM's layout (``model.embed_tokens.*``, ``model.layers.N.*``,
``model.norm.*``, ``lm_head.*``). A key map is an ordered list of ``(regex, replacement)`` pairs: the first
pattern that matches a tensor name (``re.match``, anchored at the start) rewrites that match with
``re.sub(count=1)`` and the tensor is an LLM tensor under the new name; a tensor no pattern matches belongs
to its model alone (encoders, connectors) and is carried unchanged.

Built-in key maps are data (``engine/keymaps/NAME.yaml``), chosen by name or found from ``config.json``
``architectures``::

    name: llava
    architectures: [LlavaForConditionalGeneration]
    map:
      - {match: '^language_model\\.model\\.', to: 'model.'}
      - {match: '^model\\.language_model\\.', to: 'model.'}
      - {match: '^lm_head\\.', to: 'lm_head.'}

A recipe may give a built-in name, or an inline map (a mapping ``{regex: replacement}`` in order, or a list
of ``{match, to}``).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

import yaml

from .errors import RecipeError

__all__ = ["KeyMap", "keymap_names", "load_keymap", "keymap_for_architecture", "known_architectures", "parse_keymap"]


@dataclass(frozen=True)
class KeyMap:
    """An ordered list of ``(pattern, replacement)`` pairs with a name (``inline`` for a recipe's own).

    Attributes:
        name: the built-in name, or ``inline``.
        rules: ``(regex, replacement)`` pairs, first match wins.
        architectures: the ``config.json`` architectures a built-in map is chosen for.
        description: one line for listings.
    """

    name: str
    rules: tuple[tuple[str, str], ...]
    architectures: tuple[str, ...] = ()
    description: str = ""

    def canonical(self, name: str) -> str | None:
        """The shared-namespace name of tensor ``name``, or ``None`` if it belongs to its model alone."""
        for pattern, replacement in self._compiled:
            if pattern.match(name):
                return pattern.sub(replacement, name, count=1)
        return None

    @property
    def _compiled(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return _compile(self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "map": [{"match": p, "to": r} for p, r in self.rules]}


@lru_cache(maxsize=256)
def _compile(rules: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile(p), r) for p, r in rules)


def _folder() -> Any:
    return resources.files("omnimerge.engine") / "keymaps"


def keymap_names() -> list[str]:
    """Names of the built-in key maps (``engine/keymaps/*.yaml``)."""
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".yaml"))


@lru_cache(maxsize=None)
def load_keymap(name: str) -> KeyMap:
    """A built-in key map by name.

    Raises:
        KeyError: unknown name (the message lists the built-in ones and a close match).
    """
    path = _folder() / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, keymap_names(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown key map '{name}'.{hint} Built-in key maps: {', '.join(keymap_names())}.")
    doc = yaml.safe_load(path.read_text()) or {}
    problems: list[str] = []
    keymap = parse_keymap(doc.get("map"), f"built-in key map '{name}'", problems, name=name,
                          architectures=doc.get("architectures") or (), description=doc.get("description", ""))
    if problems or keymap is None:  # a broken built-in map is a bug in omnimerge; say what it is
        raise RecipeError(problems or [f"key map '{name}' is empty"], path=str(path))
    return keymap


def keymap_for_architecture(architecture: str | None) -> KeyMap | None:
    """The built-in key map whose ``architectures`` list ``architecture`` (``None`` when there is none)."""
    if not architecture:
        return None
    for name in keymap_names():
        keymap = load_keymap(name)
        if architecture in keymap.architectures:
            return keymap
    return None


def known_architectures() -> list[str]:
    """Every architecture a built-in key map is chosen for (for messages)."""
    return sorted({a for n in keymap_names() for a in load_keymap(n).architectures})


def parse_keymap(raw: Any, what: str, problems: list[str], *, name: str = "inline",
                 architectures: Iterable[str] = (), description: str = "") -> KeyMap | None:
    """Validate a key map given as a built-in name, a ``{regex: replacement}`` mapping or a ``{match, to}`` list.

    Problems are appended to ``problems`` (nothing is raised); returns ``None`` when the map is unusable.
    """
    if isinstance(raw, str):
        try:
            return load_keymap(raw)
        except KeyError as exc:
            problems.append(f"{what}: {exc.args[0]}")
            return None
    pairs: list[tuple[Any, Any]] = []
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or set(item) != {"match", "to"}:
                problems.append(f"{what}: entry {i + 1} must be {{match: REGEX, to: REPLACEMENT}}, got {item!r}.")
                continue
            pairs.append((item["match"], item["to"]))
    else:
        problems.append(f"{what}: a key map is a built-in name ({', '.join(keymap_names())}), a mapping "
                        f"{{regex: replacement}} or a list of {{match, to}}; got {raw!r}.")
        return None
    rules: list[tuple[str, str]] = []
    for pattern, replacement in pairs:
        if not isinstance(pattern, str) or not isinstance(replacement, str):
            problems.append(f"{what}: pattern {pattern!r} -> {replacement!r} must be two strings.")
            continue
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            problems.append(f"{what}: regex {pattern!r} does not compile: {exc}.")
            continue
        try:  # a bad group reference in the replacement would otherwise surface only when a name matches
            _check_template(compiled, replacement)
        except re.error as exc:
            problems.append(f"{what}: replacement {replacement!r} of {pattern!r} is invalid: {exc}.")
            continue
        rules.append((pattern, replacement))
    if not rules:
        if not any(p.startswith(what) for p in problems):
            problems.append(f"{what}: the key map is empty; give at least one {{match, to}} pair.")
        return None
    return KeyMap(name, tuple(rules), tuple(str(a) for a in architectures), str(description))


def _check_template(pattern: re.Pattern[str], replacement: str) -> None:
    """Raise ``re.error`` when ``replacement`` names a group ``pattern`` lacks."""
    for ref in re.findall(r"\\(\d+)|\\g<([^>]+)>", replacement):
        number, named = ref
        key = number or named
        if key.isdigit():
            if int(key) > pattern.groups:
                raise re.error(f"group {key} does not exist (the pattern has {pattern.groups})")
        elif key not in pattern.groupindex:
            raise re.error(f"group '{key}' does not exist")
