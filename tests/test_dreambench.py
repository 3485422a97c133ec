"""Reading DreamBench as DreamBooth laid it out: the real folder in ../shared, and broken copies of it."""

from __future__ import annotations

import shutil

import pytest
from helpers import shared_path

from blipdiff.datasets.dreambench import FINETUNE_STEPS, DreamBenchError, read_dreambench


def test_the_real_dreambench_reads_with_its_subjects_classes_photos_and_prompts():
    bench = read_dreambench(shared_path("dreambench", "dataset"))
    assert len(bench.subjects) == 30 and sum(len(s.photos) for s in bench.subjects) == 158
    assert sorted(s.name for s in bench.subjects if s.live) == [
        "cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert {s.name for s in bench.subjects} == set(FINETUNE_STEPS)
    dog = bench.prompts(bench.subject("dog"))
    assert len(dog) == 25
    assert (dog[0].text, dog[0].kind) == ("a dog in the jungle", "recontextualization")
    assert (dog[12].text, dog[12].kind) == ("a dog wearing a rainbow scarf", "accessorization")
    assert (dog[20].text, dog[20].kind) == ("a red dog", "property")
    assert [p.kind for p in dog].count("accessorization") == 10
    plushie = bench.prompts(bench.subject("bear_plushie"))
    assert plushie[19].text == "a stuffed animal on top of a white rug" and plushie[19].kind == "recontextualization"
    assert plushie[24].text == "a cube shaped stuffed animal" and plushie[24].kind == "property"
    assert [p.kind for p in plushie].count("recontextualization") == 20
    assert all("{" not in p.text for s in bench.subjects for p in bench.prompts(s))


@pytest.fixture
def copy(tmp_path):
    source = shared_path("dreambench", "dataset")
    target = tmp_path / "dataset"
    shutil.copytree(source, target)
    return target


def test_a_broken_dreambench_is_a_clear_error(copy):
    shutil.rmtree(copy / "vase")
    with pytest.raises(DreamBenchError, match="vase: the subject folder is missing"):
        read_dreambench(copy)
    (copy / "vase").mkdir()
    with pytest.raises(DreamBenchError, match="no photos of vase"):
        read_dreambench(copy)
    shutil.copy(copy / "teapot" / "00.jpg", copy / "vase" / "00.jpg")
    assert len(read_dreambench(copy).subject("vase").photos) == 1
    prompts = copy / "prompts_and_classes.txt"
    text = prompts.read_text()
    prompts.write_text(text.replace("'a {0} {1} in the snow'.format(unique_token, class_token),\n", "", 1))
    with pytest.raises(DreamBenchError, match="24 prompts under 'Object Prompts', not 25"):
        read_dreambench(copy)
    prompts.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DreamBenchError, match="unreadable"):
        read_dreambench(copy)
    prompts.unlink()
    with pytest.raises(DreamBenchError, match="prompts_and_classes.txt: unreadable"):
        read_dreambench(copy)
