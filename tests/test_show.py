"""The `show` picture: renders for both methods, outlines the kept patches, tints/heats the others."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_token_reduction import show
from llava_token_reduction.modeling.token_reduction import gather_tokens, visionzip_assignment, visionzip_reduce
from llava_token_reduction.tiny import DEMO_SHAPE


SAMPLE = show.Path(show.__file__).resolve().parent / "assets" / "sample.png"


def test_visionzip_assignment_describes_visionzip_reduce():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 50, 8, generator=generator)
    attention = torch.rand(2, 50, generator=generator)
    keys = torch.randn(2, 50, 4, generator=generator)
    kept, rest, group = visionzip_assignment(attention, keys, 10, 5)
    out = visionzip_reduce(hidden, attention, keys, 10, 5)
    assert torch.equal(out[:, :10], gather_tokens(hidden, kept))
    assert (kept[:, 0] == 0).all() and kept.shape == (2, 10) and rest.shape == (2, 40)
    step = 40 // 5
    for b in range(2):
        for c in range(5):
            target = rest[b, c * step]
            assert group[b, c * step] == c
            members = rest[b][group[b] == c]
            members = members[members != target]
            expected = hidden[b, target] + (hidden[b, members].mean(0) if len(members) else 0)
            torch.testing.assert_close(out[b, 10 + c], expected)
    assert (visionzip_assignment(attention, keys, 10, 0)[2] == -1).all()


def _pixel(png, xy):
    return tuple(png.getpixel(xy))


@pytest.mark.parametrize("method", ["visionzip", "trim"])
def test_show_renders_the_demo_model(tmp_path, method):
    out, selection, layout = show.show(SAMPLE, method, question="Where is the house?", out=tmp_path / f"{method}.png")
    assert out.is_file() and out.stat().st_size > 20_000
    png = Image.open(out).convert("RGB")
    side = layout.cell * layout.grid
    assert png.size == (2 * side + 3 * show.GAP, show.HEADER_HEIGHT + side + show.GAP)
    assert selection.grid == DEMO_SHAPE.image_size // DEMO_SHAPE.patch_size and layout.grid == selection.grid
    assert selection.kept, "something must be kept"
    # A kept patch has the outline colour on its border (top edge middle and left edge middle).
    for patch in selection.kept[:5]:
        x0, y0, x1, y1 = layout.patch_box(patch)
        assert _pixel(png, ((x0 + x1) // 2, y0)) == show.OUTLINE
        assert _pixel(png, (x0, (y0 + y1) // 2)) == show.OUTLINE
    # Both panels live in one array; the left one is the plain image.
    left = source = np.asarray(png, dtype=np.int32)
    if method == "visionzip":
        assert selection.tokens == 64 and len(selection.kept) == 53 and len(selection.targets) == 10
        merged = [p for p, g in enumerate(selection.group) if g >= 0 and p not in selection.targets]
        assert len(merged) == 576 - 53 - 10
        # A tinted patch differs from the same patch of the plain image.
        patch = merged[len(merged) // 2]
        rx0, ry0, rx1, ry1 = layout.patch_box(patch)
        lx0, ly0, lx1, ly1 = layout.patch_box(patch, panel="left")
        centre_right = source[(ry0 + ry1) // 2 - 3, (rx0 + rx1) // 2 - 3]
        centre_left = left[(ly0 + ly1) // 2 - 3, (lx0 + lx1) // 2 - 3]
        assert np.abs(centre_right - centre_left).sum() > 30
        # Two different groups get different tints over the same source pixels.
        colours = show._group_colours(10)
        assert len({tuple(c) for c in colours}) == 10
    else:
        assert selection.tokens == len(selection.kept) + 1  # kept outliers + the mean token
        assert len(selection.scores) == 576
        # The heat map changes every patch, kept or not.
        not_kept = next(p for p in range(576) if p not in set(selection.kept))
        rx0, ry0, rx1, ry1 = layout.patch_box(not_kept)
        lx0, ly0, lx1, ly1 = layout.patch_box(not_kept, panel="left")
        assert np.abs(source[(ry0 + ry1) // 2, (rx0 + rx1) // 2] - left[(ly0 + ly1) // 2, (lx0 + lx1) // 2]).sum() > 30


def test_show_command_line(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    show.register(parser.add_subparsers())
    args = parser.parse_args(["show", "--image", str(SAMPLE), "--method", "visionzip", "--dominant-tokens", "20",
                              "--contextual-tokens", "4", "--out", str(tmp_path / "vz.png")])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed and "20+4" in printed
    assert (tmp_path / "vz.png").is_file()


def test_show_on_a_saved_checkpoint(tmp_path):
    model, _, _ = show.build_demo_model("visionzip", seed=1)
    from llava_token_reduction.tiny import build_processor

    model.save_pretrained(tmp_path / "ckpt")
    build_processor(DEMO_SHAPE).save_pretrained(tmp_path / "ckpt")
    out, selection, _ = show.show(SAMPLE, "visionzip", model_path=str(tmp_path / "ckpt"), out=tmp_path / "c.png",
                                  dominant_tokens=108, contextual_tokens=20)
    assert out.is_file() and selection.tokens == 128 and len(selection.kept) == 107
    with pytest.raises(ValueError, match="TRIM needs"):
        show.show(SAMPLE, "trim", model_path=str(tmp_path / "ckpt"), out=tmp_path / "t.png")


def test_show_out_must_be_a_writable_image_file(tmp_path, capsys):
    from llava_token_reduction import cli

    status = cli.main(["show", "--image", str(SAMPLE), "--method", "visionzip", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1 and "is a directory" in err and "show-visionzip.png" in err
    status = cli.main(["show", "--image", str(SAMPLE), "--method", "visionzip", "--out", str(tmp_path / "x.txt")])
    assert status == 1 and "not an image format" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
