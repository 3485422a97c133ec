"""The decode limits: the configured pixel limit decides, up to the size Pillow refuses to open."""

from __future__ import annotations

import pytest
from PIL import Image

from blipdiff.infra.images import DEFAULT_MAX_PIXELS, MAX_DECODABLE_PIXELS, DecodeFailure, inspect_image


def blank_png(path, width: int, height: int):
    Image.new("1", (width, height)).save(path)
    return path


def test_a_limit_above_pillows_warning_threshold_is_honoured(tmp_path):
    large = blank_png(tmp_path / "large.png", 10_000, 9_000)  # 90 M pixels: above Pillow's warning threshold
    assert 10_000 * 9_000 > DEFAULT_MAX_PIXELS
    with pytest.raises(DecodeFailure, match=f"10000x9000 exceeds the {DEFAULT_MAX_PIXELS}-pixel limit"):
        inspect_image(large)
    with pytest.warns(Image.DecompressionBombWarning):
        info = inspect_image(large, max_pixels=100_000_000)
    assert (info.width, info.height) == (10_000, 9_000)


def test_beyond_what_pillow_opens_is_a_decompression_bomb(tmp_path):
    bomb = blank_png(tmp_path / "bomb.png", 14_000, 13_000)
    assert 14_000 * 13_000 > MAX_DECODABLE_PIXELS
    with pytest.raises(DecodeFailure, match="decompression bomb"):
        inspect_image(bomb, max_pixels=MAX_DECODABLE_PIXELS)


def test_no_configuration_asks_for_more_than_pillow_opens():
    from pydantic import ValidationError

    from blipdiff.datasets.fetch import FetchConfig

    with pytest.raises(ValidationError, match="less than or equal to"):
        FetchConfig(subjects="s.parquet", out="o", max_pixels=MAX_DECODABLE_PIXELS + 1)
