"""Training pairs from folders of photos: finding and reading files, crops, errors, reproducibility."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stablesr_min.degradation import DegradationConfig
from stablesr_min.errors import DataError
from stablesr_min.train.data import (MAX_SIDE, CleanCrops, TrainingPairs, augment, find_images, pad_and_crop, read_rgb,
                                     reflect_101_index, smallest_gt_size)

from photos import PHOTOS

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Crops of real photos in several formats and sizes, one in a subfolder, one smaller than 64."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.open(PHOTOS / "astronaut.png").crop((100, 50, 220, 150)).save(root / "astronaut.png")
    Image.open(PHOTOS / "rocket.jpg").crop((200, 100, 300, 180)).save(root / "sub" / "rocket.jpg", quality=92)
    Image.open(PHOTOS / "brick.png").crop((0, 0, 90, 70)).save(root / "sub" / "deeper" / "brick.png")
    Image.open(PHOTOS / "ihc.png").crop((0, 0, 40, 30)).save(root / "sub" / "small.webp")
    (root / "notes.txt").write_text("not an image, and not named like one")
    return root


def test_finds_images_recursively_and_sorted(folder):
    files = find_images([folder])
    assert [f.relative_to(folder).as_posix() for f in files] == [
        "astronaut.png", "sub/deeper/brick.png", "sub/rocket.jpg", "sub/small.webp"]
    assert find_images([folder / "sub", folder]) == files[1:] + files[:1]  # each photo once


def test_reads_8_and_16_bit_grey_and_colour(tmp_path):
    grey16 = np.array([[0, 32768], [65535, 13107]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    Image.fromarray(np.array([[0, 51], [255, 102]], dtype=np.uint8)).save(tmp_path / "grey8.png")
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 1] = (255, 0, 51)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((2, 2), 128, np.uint8)])).save(tmp_path / "rgba.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    g16 = read_rgb(tmp_path / "grey16.png")
    assert g16.shape == (3, 2, 2) and g16.dtype == torch.float32
    torch.testing.assert_close(g16[0], torch.tensor([[0, 32768 / 65535], [1, 0.2]]))
    assert torch.equal(g16[0], g16[2])
    torch.testing.assert_close(read_rgb(tmp_path / "grey8.png")[1], torch.tensor([[0, 0.2], [1, 0.4]]))
    for name in ("rgb.png", "rgba.png"):
        torch.testing.assert_close(read_rgb(tmp_path / name)[:, 0, 1], torch.tensor([1, 0, 0.2]))


def test_reflect_101_padding_repeats_as_opencv_does():
    assert reflect_101_index(3, 9).tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert reflect_101_index(1, 3).tolist() == [0, 0, 0]
    for length, size in ((5, 9), (4, 30), (7, 7)):
        expected = np.pad(np.arange(length), (0, size - length), mode="reflect")
        assert reflect_101_index(length, size).tolist() == expected.tolist()


def test_small_images_are_padded_at_the_bottom_right():
    img = torch.rand(3, 20, 30)
    out = pad_and_crop(img, 64, torch.Generator().manual_seed(0))
    assert out.shape == (3, 64, 64)
    assert torch.equal(out[:, :20, :30], img)
    assert torch.equal(out[:, 20, :30], img[:, 18])  # the edge row itself is not repeated
    assert torch.equal(out[:, :20, 30], img[:, :, 28])


def test_crops_are_random_windows_of_large_images():
    img = torch.arange(100.0).view(1, 10, 10).expand(3, 10, 10)
    gen = torch.Generator().manual_seed(1)
    corners = {pad_and_crop(img, 4, gen)[0, 0, 0].item() for _ in range(50)}
    assert len(corners) > 10 and all(c // 10 <= 6 and c % 10 <= 6 for c in corners)


def test_augment_flips():
    img = torch.rand(3, 5, 7)
    gen = torch.Generator().manual_seed(0)
    assert augment(img, gen, hflip=False, rot=False) is img
    outs = [augment(img, gen, hflip=True, rot=False) for _ in range(40)]
    assert any(torch.equal(o, img) for o in outs) and any(torch.equal(o, img.flip(-1)) for o in outs)
    rotated = [augment(img, gen, hflip=False, rot=True) for _ in range(40)]
    assert any(o.shape == (3, 7, 5) for o in rotated)


def test_batches_have_the_documented_shapes_and_range(folder):
    pairs = TrainingPairs([folder], gt_size=64, batch_size=2)
    assert len(pairs.files) == 4
    for _ in range(3):
        lr, gt = pairs.next_batch()
        assert lr.shape == (2, 3, 16, 16) and gt.shape == (2, 3, 64, 64)
        assert lr.dtype == gt.dtype == torch.float32
        assert lr.min() >= 0 and lr.max() <= 1 and gt.min() >= 0 and gt.max() <= 1


def test_same_seed_same_batches_other_seed_other_batches(folder):
    cfg = DegradationConfig(queue_size=4)
    a, b, c = (TrainingPairs([folder], 64, 2, cfg, seed=s) for s in (1, 1, 2))
    for _ in range(3):
        (lr_a, gt_a), (lr_b, gt_b), (lr_c, _) = a.next_batch(), b.next_batch(), c.next_batch()
        assert torch.equal(lr_a, lr_b) and torch.equal(gt_a, gt_b)
        assert not torch.equal(lr_a, lr_c)


def test_state_dict_round_trip_continues_bit_identically(folder, tmp_path):
    cfg = DegradationConfig(queue_size=4)
    original = TrainingPairs([folder], 64, 2, cfg, seed=3)
    for _ in range(3):  # past the pool's filling, into its exchanges
        original.next_batch()
    state = original.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["generator"].dtype == torch.uint8
    save_file(state, tmp_path / "data.safetensors")
    expected = [original.next_batch() for _ in range(3)]
    resumed = TrainingPairs([folder], 64, 2, cfg, seed=99)
    resumed.load_state_dict(load_file(tmp_path / "data.safetensors"))
    for lr, gt in expected:
        lr_r, gt_r = resumed.next_batch()
        assert torch.equal(lr, lr_r) and torch.equal(gt, gt_r)


def test_a_fresh_state_round_trip_also_continues(folder):
    fresh = TrainingPairs([folder], 64, 2, DegradationConfig(queue_size=2), seed=4)
    state = fresh.state_dict()
    lr, gt = fresh.next_batch()
    other = TrainingPairs([folder], 64, 2, DegradationConfig(queue_size=2), seed=5)
    other.load_state_dict(state)
    lr_o, gt_o = other.next_batch()
    assert torch.equal(lr, lr_o) and torch.equal(gt, gt_o)


def test_clean_batches_and_crop_size(folder):
    cfg = DegradationConfig(no_degradation_prob=1.0, queue_size=0, crop_size=96, use_usm=False)
    lr, gt = TrainingPairs([folder], 64, 2, cfg).next_batch()
    assert gt.shape == (2, 3, 64, 64)
    torch.testing.assert_close(lr, torch.nn.functional.avg_pool2d(gt, 4))


def test_the_smallest_gt_size_works_and_one_below_is_refused(folder):
    cfg = DegradationConfig()
    smallest = smallest_gt_size(cfg, 4)
    assert smallest == 44
    pairs = TrainingPairs([folder], smallest, 1, cfg)
    for _ in range(4):
        lr, _ = pairs.next_batch()
        assert lr.shape == (1, 3, 11, 11)
    with pytest.raises(DataError) as e:
        TrainingPairs([folder], smallest - 4, 1, cfg)
    assert str(e.value) == "--gt-size 40 is too small for the 21x21 blur kernels; use at least 44"


def test_error_messages(folder, tmp_path):
    def message(*args, **kwargs) -> str:
        with pytest.raises(DataError) as e:
            TrainingPairs(*args, **kwargs)
        return str(e.value)

    missing = tmp_path / "missing"
    assert message([missing], 64, 2) == f"{missing}: no such folder"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    assert message([folder, empty], 64, 2) == (
        f"{empty}: no images found (.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff, in it or its subfolders)")
    a_file = folder / "astronaut.png"
    assert message([a_file], 64, 2) == f"{a_file}: not a folder (give folders of training images)"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "good.png").write_bytes((folder / "astronaut.png").read_bytes())
    (broken / "bad.png").write_bytes(b"this is not a PNG")
    assert message([broken], 64, 2) == f"{broken / 'bad.png'}: not an image that can be read; fix or remove it"
    assert message([folder], 66, 2) == "--gt-size 66 is not a multiple of the scale 4"
    assert message([folder], 64, 7) == ("the pair pool's queue_size 180 is not a multiple of the batch size 7; "
                                         "choose a batch size that divides it")
    assert message([folder], 64, 0) == "batch size 0: must be at least 1"
    assert message([], 64, 2) == "no training folders given"


def test_a_file_that_breaks_after_the_start_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes((PHOTOS / "camera.png").read_bytes())
    truncated = tmp_path / "b.png"
    truncated.write_bytes((PHOTOS / "brick.png").read_bytes()[:3000])  # a valid header, no image data
    pairs = TrainingPairs([tmp_path], 64, 2, DegradationConfig(queue_size=0))
    with pytest.raises(DataError) as e:
        pairs.next_batch()
    assert str(e.value).startswith(f"{truncated}: cannot read it (")
    assert str(e.value).endswith("; fix or remove it") and "\n" not in str(e.value)


def test_resuming_with_other_data_or_settings_is_refused(folder, tmp_path):
    state = TrainingPairs([folder], 64, 2).state_dict()
    with pytest.raises(DataError) as e:
        TrainingPairs([folder / "sub"], 64, 2).load_state_dict(state)
    assert str(e.value) == "the saved training state saw 4 images, these folders hold 3; resume with the same data"
    with pytest.raises(DataError) as e:
        TrainingPairs([folder], 128, 2).load_state_dict(state)
    assert str(e.value) == ("the saved training state used --gt-size 64, batch size 2, scale 4, crop size 64; "
                            "resume with the same settings")


def test_skip_small_leaves_out_what_the_official_dataset_skips(tmp_path):
    """The official filter: fewer pixels than 384 x 384, or a file under 100 KiB."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(tmp_path / "large.png")  # ~470 KiB
    Image.fromarray(rng.integers(0, 256, (370, 390, 3), dtype=np.uint8)).save(tmp_path / "few_pixels.png")  # 370 x 390 < 384 x 384
    Image.new("RGB", (512, 512), (90, 120, 30)).save(tmp_path / "flat_small_file.png")  # a few KiB
    kept = TrainingPairs([tmp_path], 64, 1, skip_small=True)
    assert [p.name for p in kept.files] == ["large.png"]
    assert sorted(p.name for p in kept.skipped) == ["few_pixels.png", "flat_small_file.png"]
    assert len(TrainingPairs([tmp_path], 64, 1).files) == 3  # off by default: small photos are padded
    (tmp_path / "large.png").unlink()
    with pytest.raises(DataError, match=f"^every photo in {tmp_path} has fewer pixels than 384 x 384 or under 100 KiB"):
        TrainingPairs([tmp_path], 64, 1, skip_small=True)


def test_photos_beyond_pillows_decompression_bomb_limit_end_in_one_line(tmp_path):
    """Pillow refuses to open images over 2 x MAX_IMAGE_PIXELS with a DecompressionBombError traceback; the
    training data reads their headers without that limit and refuses them by its own bound, in one line."""
    from PIL import Image

    from stablesr_min.train.data import check_readable
    from test_cli_hostile import write_png

    big = write_png(tmp_path / "big.png", 20_000, 10_000, 8, 2, bytes(301))  # a header: 200 M pixels
    assert 20_000 * 10_000 > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match=r"big.png: 20000x10000 is more pixels than a training photo may have"):
        check_readable(big)


def test_a_folder_given_twice_or_inside_another_counts_each_photo_once(tmp_path, capsys):
    from stablesr_min.train.data import find_images

    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert find_images([tmp_path, tmp_path / "sub", tmp_path]) == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    assert capsys.readouterr().err == ("note: 3 image(s) found through more than one of the folders given; each is "
                                       "used once\n")


def test_a_photo_too_large_to_decode_is_refused_from_its_header(tmp_path):
    from test_cli_hostile import write_png

    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    write_png(tmp_path / "huge.png", MAX_SIDE + 1, MAX_SIDE, 8, 2, bytes(301))  # a header, and a little data
    with pytest.raises(DataError) as e:
        TrainingPairs([tmp_path], 64, 1)
    assert str(e.value) == (f"{tmp_path / 'huge.png'}: {MAX_SIDE + 1}x{MAX_SIDE} is more pixels than a training photo "
                            f"may have ({MAX_SIDE}x{MAX_SIDE}: each is decoded whole before it is cropped); downscale "
                            "it or cut it into tiles")
    with pytest.raises(DataError, match="huge.png"):
        CleanCrops([tmp_path], 64, 1)


@pytest.mark.parametrize("size", [0, MAX_SIDE + 4])
def test_crop_sizes_are_bounded_before_anything_is_allocated(folder, size):
    with pytest.raises(DataError) as e:
        CleanCrops([folder], size, 1)
    assert str(e.value) == f"--crop {size}: must be 1 to {MAX_SIDE} pixels (the largest a training photo's side may be)"
    if size:
        with pytest.raises(DataError) as e:
            TrainingPairs([folder], size, 1)
        assert str(e.value) == (f"--gt-size {size}: must be 1 to {MAX_SIDE} pixels (the largest a training photo's "
                                "side may be)")
