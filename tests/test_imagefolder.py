"""ImageNet-style data (bench.imagefolder) on a tree of real JPEGs made here: its classes in torchvision's
order, the paper's crops and flips, the 10 crops of evaluation, batches as a pure function of (seed,
step) split over processes, and a corrupt file named."""
import io
import tarfile

import numpy as np
import pytest
import torch

from bench import imagefolder as imf


def _jpeg(rng, h, w) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """train/ and val/ with three classes (not created in sorted order), images of several sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("n0300", "n0100", "n0200"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / split / cls / f"{cls}_{i}.JPEG").write_bytes(_jpeg(rng, 40 + 8 * i, 60 - 4 * i))
    return root


def test_the_tree_is_read_in_torchvisions_class_order(tree):
    from torchvision.datasets import ImageFolder

    t = imf.scan(tree)
    assert t.classes == ("n0100", "n0200", "n0300") and len(t.train) == 18 and len(t.val) == 6
    reference = ImageFolder(str(tree / "train"))
    assert [(i.path, i.label) for i in t.train] == [(p, label) for p, label in reference.samples]
    assert list(reference.classes) == list(t.classes)


def test_an_archive_of_the_tree_holds_the_same_images(tree, tmp_path):
    archive = tmp_path / "imagenet.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree / "train", arcname="imagenet/train")
        tar.add(tree / "val", arcname="imagenet/val")
    a, t = imf.scan(archive), imf.scan(tree)
    assert a.classes == t.classes and [i.label for i in a.train] == [i.label for i in t.train]
    for x, y in zip(a.val, t.val):
        assert torch.equal(imf.decode(x.path), imf.decode(y.path))


def test_a_training_crop_is_a_224_window_of_the_image_at_a_random_scale_perhaps_mirrored():
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    seen_flip, sides = set(), set()
    for i in range(12):
        g = imf.image_generator(seed=3, epoch=1, index=i)
        crop = imf.train_crop(img, g)
        assert crop.shape == (3, 224, 224) and crop.dtype == torch.uint8
        g = imf.image_generator(seed=3, epoch=1, index=i)  # replay the same choices by hand
        side = int(torch.randint(256, 481, (1,), generator=g))
        big = imf.resize_shorter(img, side)
        top = int(torch.randint(0, big.shape[1] - 223, (1,), generator=g))
        left = int(torch.randint(0, big.shape[2] - 223, (1,), generator=g))
        flip = bool(torch.rand(1, generator=g) < 0.5)
        window = big[:, top:top + 224, left:left + 224]
        assert torch.equal(crop, window.flip(2) if flip else window)
        assert min(big.shape[1:]) == side and 256 <= side <= 480
        seen_flip.add(flip)
        sides.add(side)
    assert seen_flip == {True, False} and len(sides) > 6
    assert torch.equal(imf.train_crop(img, imf.image_generator(3, 1, 0)), imf.train_crop(img, imf.image_generator(3, 1, 0)))
    assert not torch.equal(imf.train_crop(img, imf.image_generator(3, 1, 0)), imf.train_crop(img, imf.image_generator(4, 1, 0)))


def test_evaluation_takes_the_centre_or_the_ten_standard_crops():
    img = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    big = imf.resize_shorter(img, 256)
    assert big.shape == (3, 256, 341)
    centre = imf.centre_crop(img)
    assert torch.equal(centre, big[:, 16:240, 58:282])
    ten = imf.ten_crops(img)
    assert ten.shape == (10, 3, 224, 224)
    corners = [big[:, :224, :224], big[:, :224, -224:], big[:, -224:, :224], big[:, -224:, -224:], centre]
    for k, c in enumerate(corners):
        assert torch.equal(ten[k], c) and torch.equal(ten[5 + k], c.flip(2))


def test_a_corrupt_image_is_named(tree, tmp_path):
    bad = tmp_path / "train" / "n0100"
    bad.mkdir(parents=True)
    (bad / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (tmp_path / "val" / "n0100").mkdir(parents=True)
    (tmp_path / "val" / "n0100" / "x.JPEG").write_bytes((tree / "val" / "n0100" / "n0100_0.JPEG").read_bytes())
    t = imf.scan(tmp_path)
    with pytest.raises(imf.ImageFolderError, match=rf"^cannot decode {bad / 'broken.JPEG'} \("):
        imf.decode(t.train[0].path)
    with pytest.raises(imf.ImageFolderError, match="no train/<class>/ folders"):
        imf.scan(tmp_path / "train")


def test_batches_are_a_function_of_seed_and_step_and_split_over_processes(tree):
    t = imf.scan(tree)
    mean = torch.zeros(3, 224, 224)
    whole = imf.StreamLoader(t.train, mean, batch_size=6, seed=1, device=torch.device("cpu"), workers=0)
    run = [whole.batch(i) for i in range(5)]  # 3 steps per epoch: steps 3 and 4 are the second epoch
    fresh = imf.StreamLoader(t.train, mean, batch_size=6, seed=1, device=torch.device("cpu"), workers=0)
    x4, y4 = fresh.batch(4)  # started at step 4, as a resumed run would
    assert torch.equal(x4, run[4][0]) and torch.equal(y4, run[4][1])
    halves = [imf.StreamLoader(t.train, mean, batch_size=6, seed=1, device=torch.device("cpu"), workers=0, rank=r,
                               world=2).batch(2) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), run[2][0])
    assert torch.equal(torch.cat([h[1] for h in halves]), run[2][1])
    firsts = {tuple(b[1].tolist()) for b in run[:3]}
    assert sorted(sum((list(b) for b in firsts), [])) == sorted(i.label for i in t.train)  # an epoch sees each once
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        imf.StreamLoader(t.train, mean, batch_size=6, seed=1, device=torch.device("cpu"), world=4)
