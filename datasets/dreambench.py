"""DreamBench, read from a folder in the layout of DreamBooth's ``dataset/``: one folder of photos per
subject and ``prompts_and_classes.txt`` (subject → class, then the 25 object prompts and the 25 live-subject
prompts as Python ``'a {0} {1} ...'.format(unique_token, class_token)`` lines).

Each prompt is kept with its DreamBench ``text``, the identifier removed and the class noun kept ("a dog in
the jungle", "a red backpack"; what CLIP-T compares with), its ``kind`` (re-contextualisation,
accessorisation or property, by its place in the list as the DreamBooth paper orders them: objects 20 + 5,
live subjects 10 + 10 + 5), and the exact texts each method's text encoder is given:

- BLIP-Diffusion (``blip_diffusion_text``), the authors' evaluation code's form for a "a {V} {class} ..."
  prompt: ``"a {class} " + ", ".join([words after the class] * 15)`` ("a dog in the jungle, in the jungle,
  ..."), the subject embeddings inserted after "a". A property prompt ("a red {V} {class}") has no words
  after the class, and the authors' form for it is not known: it gets the released pipeline's own template
  with the attribute in the target, "a {target}" = "a red backpack", repeated as the authors repeat (15,
  joined by ", "), so the subject embeddings go in after "a" as for every other prompt.
- DreamBooth (``dreambooth_text``): DreamBench's prompt with the identifier ("a red sks backpack").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from blipdiff.infra.images import IMAGE_SUFFIXES

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"cat", "dog"})
PROMPTS_PER_LIST = 25
_TEMPLATE = re.compile(r"^'(?P<template>[^']*\{0\}[^']*\{1\}[^']*)'\.format\(unique_token, class_token\),?$")
_CONTEXT_PREFIX = "a {0} {1} "
# The authors' DreamBench evaluation repeats the words after the class 15 times (the 61-token truncation
# keeps them all for most prompts).
AUTHORS_PROMPT_REPS = 15
# Names the texts given to the text encoders below; part of an evaluation's fingerprint, so a change of form
# is never compared with runs made before it.
PROMPT_FORM = "authors-15"
# Fine-tuning steps per subject, the BLIP-Diffusion paper's appendix Table 3.
FINETUNE_STEPS = {
    "backpack": 110, "backpack_dog": 110, "bear_plushie": 110, "berry_bowl": 40, "can": 70, "candle": 80, "cat": 40,
    "cat2": 50, "clock": 120, "colorful_sneaker": 80, "dog": 50, "dog2": 50, "dog3": 40, "dog5": 20, "dog6": 40,
    "dog7": 50, "dog8": 40, "duck_toy": 60, "fancy_boot": 50, "grey_sloth_plushie": 70, "monster_toy": 120,
    "pink_sunglasses": 90, "poop_emoji": 90, "rc_car": 120, "red_cartoon": 70, "robot_toy": 110,
    "shiny_sneaker": 80, "teapot": 120, "vase": 120, "wolf_plushie": 80}


class DreamBenchError(ValueError):
    """The folder is not DreamBench as DreamBooth laid it out; the message says what is wrong."""


@dataclass(frozen=True)
class Prompt:
    index: int
    template: str  # DreamBench's, with {0} the identifier and {1} the class
    kind: str  # recontextualization, accessorization or property
    text: str  # identifier removed, class kept: CLIP-T's text
    blip_diffusion_text: str  # the exact text BLIP-Diffusion's text encoder gets
    class_name: str

    def dreambooth_text(self, identifier: str) -> str:
        """The exact text DreamBooth's text encoder gets: the prompt naming the subject by its identifier."""
        return self.template.format(identifier, self.class_name)


@dataclass(frozen=True)
class Subject:
    name: str
    class_name: str
    photos: tuple[Path, ...]

    @property
    def live(self) -> bool:
        return self.class_name in LIVE_CLASSES


@dataclass(frozen=True)
class DreamBench:
    folder: Path
    subjects: tuple[Subject, ...]
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]

    def subject(self, name: str) -> Subject:
        for subject in self.subjects:
            if subject.name == name:
                return subject
        raise DreamBenchError(f"no subject {name!r} in {self.folder}; it has {', '.join(s.name for s in self.subjects)}")

    def prompts(self, subject: Subject) -> list[Prompt]:
        """The subject's 25 prompts: the live-subject list for cats and dogs, the object list otherwise."""
        templates = self.live_templates if subject.live else self.object_templates
        prompts = []
        for index, template in enumerate(templates):
            if index >= PROMPTS_PER_LIST - 5:
                kind = "property"
            elif subject.live and index >= 10:
                kind = "accessorization"
            else:
                kind = "recontextualization"
            text = template.replace("{0} ", "").format(None, subject.class_name)
            if kind == "property":
                model_text = ", ".join([text] * AUTHORS_PROMPT_REPS)
            else:
                words = template.removeprefix(_CONTEXT_PREFIX)
                model_text = f"a {subject.class_name} " + ", ".join([words] * AUTHORS_PROMPT_REPS)
            prompts.append(Prompt(index, template, kind, text, model_text, subject.class_name))
        return prompts


def _prompt_lists(lines: list[str], path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The templates under "Object Prompts" and under "Live Subject Prompts"."""
    lists: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line in ("Object Prompts", "Live Subject Prompts"):
            current = lists.setdefault(line, [])
        elif current is not None and (match := _TEMPLATE.match(line)):
            current.append(match.group("template"))
    for heading in ("Object Prompts", "Live Subject Prompts"):
        found = lists.get(heading, [])
        if len(found) != PROMPTS_PER_LIST:
            raise DreamBenchError(f"{path}: {len(found)} prompts under {heading!r}, not {PROMPTS_PER_LIST}")
        if any(not template.startswith(_CONTEXT_PREFIX) and not template.endswith("{0} {1}") for template in found):
            raise DreamBenchError(f"{path}: a prompt under {heading!r} is neither 'a {{0}} {{1}} ...' nor '... {{0}} {{1}}'")
    return tuple(lists["Object Prompts"]), tuple(lists["Live Subject Prompts"])


def read_dreambench(folder: Path) -> DreamBench:
    """DreamBench from ``folder``; a missing or unreadable prompts file, a missing subject folder or a
    subject without photos is a DreamBenchError naming it."""
    path = folder / PROMPTS_FILE
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise DreamBenchError(f"{path}: unreadable ({error})") from error
    try:
        start = lines.index("subject_name,class") + 1
    except ValueError:
        raise DreamBenchError(f"{path}: no 'subject_name,class' table") from None
    subjects = []
    for line in lines[start:]:
        if not line:
            break
        name, _, class_name = line.partition(",")
        if not name or not class_name:
            raise DreamBenchError(f"{path}: {line!r} is not 'subject,class'")
        subject_folder = folder / name
        if not subject_folder.is_dir():
            raise DreamBenchError(f"{subject_folder}: the subject folder is missing")
        photos = tuple(sorted(p for p in subject_folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        if not photos:
            raise DreamBenchError(f"{subject_folder}: no photos of {name}")
        subjects.append(Subject(name, class_name.strip(), photos))
    if not subjects:
        raise DreamBenchError(f"{path}: no subjects listed")
    object_templates, live_templates = _prompt_lists(lines, path)
    return DreamBench(folder, tuple(subjects), object_templates, live_templates)
