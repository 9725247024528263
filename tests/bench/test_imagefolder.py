"""ImageNet-style data (bench.imagefolder) on a tree of real JPEGs made here: its classes in torchvision's
order, the paper's crops and flips, the 10 crops of evaluation, batches as a pure function of (seed,
step) split over processes, and a corrupt file named."""
import io
import os
import tarfile
import time

import numpy as np
import pytest
import torch


from bench import checkpoints, imagefolder as imf, profile_tables


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


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_an_archive_read_by_workers_after_the_parent_read_it_gives_every_image(tree, tmp_path, mode):
    # the parent reads (and opens the archive) first; then two worker processes read the same archive: each must
    # read its own members (a shared file offset gave 'two SOI markers' on good images)
    archive = tmp_path / ("imagenet.tar" if mode == "w" else "imagenet.tar.gz")
    with tarfile.open(archive, mode) as tar:
        tar.add(tree / "train", arcname="imagenet/train")
        tar.add(tree / "val", arcname="imagenet/val")
    t, loose = imf.scan(archive), imf.scan(tree)
    assert (t.train.spans is None) == (mode == "w:gz")  # random access into an uncompressed tar only
    assert imf.scan(archive).train.spans is None or (imf.scan(archive).train.spans == t.train.spans).all()  # cached
    items = t.train + t.val
    want = [imf.decode(p.path) for p in loose.train + loose.val]
    assert torch.equal(imf.decode_data(items.read(0), items.path(0)), want[0])
    loader = torch.utils.data.DataLoader(imf.EvalSet(items, ten=False), batch_size=4, **imf.loader_options(2))
    got = torch.cat([x for x, _ in imf.batches(loader)])
    assert torch.equal(got, torch.stack([imf.centre_crop(img) for img in want]))


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_a_stalled_worker_ends_with_an_error_and_leaves_no_process_behind(monkeypatch):
    import multiprocessing

    from tests.fakes import Stalling

    monkeypatch.setattr(imf, "LOADER_TIMEOUT_S", 3.0)
    loader = torch.utils.data.DataLoader(Stalling(), batch_size=2, **imf.loader_options(2))
    with pytest.raises(imf.ImageFolderError, match="workers delivered nothing for 3 s .a worker stalled"):
        list(imf.batches(loader))
    deadline = time.time() + 30
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.2)
    assert not multiprocessing.active_children()


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


def test_resizing_on_the_cpu_is_the_antialiased_bilinear_resize_within_one_level(tree):
    """The CPU resizes uint8 directly (torch's uint8 kernel); it must agree with the float computation
    (what CUDA runs) up to rounding, down and up."""
    import torch.nn.functional as F

    img = imf.decode(str(tree / "train" / "n0100" / "n0100_3.JPEG"))  # 64 x 48
    for side in (24, 256, 300):
        got = imf.resize_shorter(img, side)
        size = tuple(got.shape[1:])
        ref = F.interpolate(img[None].double(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        assert got.dtype == torch.uint8 and min(size) == side
        assert (got.double() - ref).abs().max() < 1.001, side  # fixed-point weights: a level, and a hair


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


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_on_the_device_gives_the_workers_batches_exactly_on_the_cpu(tree, tmp_path, workers):
    """decode_on="device": the workers only read, the device decodes and augments, with the same random
    choices; on the CPU the decoder is the same libjpeg-turbo, so every pixel agrees. A PNG in the tree
    takes PIL's path either way, with the lighting augmentation on."""
    from PIL import Image

    import shutil

    shutil.copytree(tree, tmp_path / "t")
    png = tmp_path / "t" / "train" / "n0200" / "n0200_9.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(png)
    t = imf.scan(tmp_path / "t")
    mean = torch.rand(3, 224, 224)
    kw = dict(batch_size=6, seed=3, device=torch.device("cpu"), workers=workers, lighting=True)
    by_workers = imf.StreamLoader(t.train, mean, **kw)
    on_device = imf.StreamLoader(t.train, mean, decode_on="device", **kw)
    for it in (0, 1, 2, 3, 5):  # the first epoch, and into the second after a jump (a resume)
        (xw, yw), (xd, yd) = by_workers.batch(it), on_device.batch(it)
        assert torch.equal(xw, xd) and torch.equal(yw, yd), it
    for loader in (by_workers, on_device):  # workers left to the garbage collector take ~5 s each to stop
        loader.close()
    with pytest.raises(ValueError, match="decode_on must be one of workers, device, got 'gpu'"):
        imf.StreamLoader(t.train, mean, decode_on="gpu", **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_device_decodes_the_workers_images_up_to_the_decoders_rounding(tree):
    """nvJPEG against libjpeg-turbo: the same images, sizes and random choices; pixels within a few levels."""
    t = imf.scan(tree)
    paths = [i.path for i in t.train]
    on_gpu = imf.decode_many([imf.read_bytes(p) for p in paths], paths, torch.device("cuda"))
    for p, img in zip(paths, on_gpu):
        ref = imf.decode(p)
        assert img.device.type == "cuda" and img.shape == ref.shape
        assert (img.cpu().int() - ref.int()).abs().float().mean() < 2
    mean = torch.zeros(3, 224, 224)
    kw = dict(batch_size=6, seed=3, workers=0)
    xw, yw = imf.StreamLoader(t.train, mean, device=torch.device("cpu"), **kw).batch(1)
    xd, yd = imf.StreamLoader(t.train, mean, device=torch.device("cuda"), decode_on="device", **kw).batch(1)
    assert torch.equal(yd.cpu(), yw) and (xd.cpu() - xw).abs().mean() < 2 / 255


def test_decoding_many_names_the_one_file_no_decoder_reads(tree, tmp_path):
    good = (tree / "val" / "n0100" / "n0100_0.JPEG").read_bytes()
    bad = b"\xff\xd8\xff\xe0 not a jpeg at all"
    imgs = imf.decode_many([good, good], ["a.JPEG", "b.JPEG"], torch.device("cpu"))
    assert len(imgs) == 2 and torch.equal(imgs[0], imf.decode(str(tree / "val" / "n0100" / "n0100_0.JPEG")))
    with pytest.raises(imf.ImageFolderError, match=r"^cannot decode b\.JPEG \("):
        imf.decode_many([good, bad, good], ["a.JPEG", "b.JPEG", "c.JPEG"], torch.device("cpu"))


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory):
    """Imagenette's layout (imagenette2/train|val/<wnid>/*.JPEG), ten classes, a few small JPEGs each."""
    root = tmp_path_factory.mktemp("imagenette")
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 1)):
        for c in range(10):
            folder = root / "imagenette2" / split / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{c}_{i}.JPEG").write_bytes(_jpeg(rng, 36, 48))
    return root


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_an_imagenet_style_sweep_trains_at_224_with_the_10_crop_test_and_reports_table_2(imagenette, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bench import records

    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": str(root)}
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bench", "sweep", "--preset", "imagenette", "--data-root", str(imagenette),
            "--models", "plain,resnet", "--depths", "18", "--width", "0.125", "--batch-size", "8", "--iterations", "2",
            "--eval-every", "1", "--loader-workers", "0", "--device", "cpu", "--out", str(out)]  # epochs
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    runs, curves = records.load(out)
    assert sorted(runs["model"]) == ["plain18", "resnet18"] and (runs["dataset"] == "imagenette").all()
    assert runs["final_test_err_10crop"].between(0, 1).all() and (runs["ten_crop"]).all()
    assert (runs["shortcut"] == "A").all()  # the paper's Table 2 ResNets: option A
    assert (runs["decode_on"] == "workers").all() and (runs["train_path"] == "stream-loader+eager").all()
    # the preset's schedule counts epochs of the data found: 40 training images, 8 a step, 5 steps an epoch
    assert curves["epoch"].tolist()[:2] == [1.0, 2.0] and curves["iteration"].tolist()[:2] == [5, 10]
    assert (runs["iterations"] == 2).all() and (runs["schedule_in"] == "epochs").all()
    saved = checkpoints.load_torch(records.paths(out, runs["run_id"].iloc[0])["weights"])
    assert saved["model"]["stem.0.weight"].shape[-1] == 7  # the 7x7 stem of 224-pixel inputs
    import pandas as pd

    diag = subprocess.run([sys.executable, "-m", "bench", "diagnose", str(out), "--max-images", "6", "--draws", "1",
                           "--no-shattered"], capture_output=True, text=True, env=env, timeout=300)
    assert diag.returncode == 0, diag.stdout + diag.stderr
    assert "the centre crops of the first 6 of 10 val/ images" in diag.stderr
    les = pd.read_parquet(out / "analysis" / "lesion.parquet")
    assert set(les["model"]) == {"plain18", "resnet18"} and (les["images"] == 6).all()
    assert les["error"].between(0, 1).all() and len(les) > 4
    # what they were computed on: the evaluation's centre crops of val/, the run's own mean image, its 7x7 stem
    from bench import analysis

    notes = []
    (_, spec, net, x, y, mean, train_x), *_ = analysis._saved_nets(out, runs, imagenette, notes, "t", tree_images=3)
    tree = imf.scan(imagenette / "imagenette2")
    assert torch.equal(x, torch.stack([imf.centre_crop(imf.decode(i.path)) for i in tree.val[:3]]))
    assert y.tolist() == [i.label for i in tree.val[:3]] and len(train_x) == 40
    assert torch.equal(mean, imf.tree_mean(tree, imf.tree_sets(tree, spec.recipe)["train"]))
    assert net.stem[0].kernel_size == (7, 7) and notes == ["t: imagenette (ImageNet-style data): the centre crops "
                                                           "of the first 3 of 10 val/ images"]
    # shattered gradients too (in this process, on one image: 65 input gradients at 224 px per net and state)
    sha = analysis.diagnose(out, runs, lesion=False, max_images=6, images=1, progress=False)["shattered"]
    assert set(sha["state"]) == {"init", "trained"} and set(sha["model"]) == {"plain18", "resnet18"}
    assert (sha.loc[sha["k"] == 0, "correlation"] - 1).abs().max() < 1e-6
    rep = subprocess.run([sys.executable, "-m", "bench", "report", str(out), "--no-responses"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert rep.returncode == 0, rep.stderr
    md = (out / "report" / "report.md").read_text()
    assert "Table 2" in md and "10-crop" in md and "lesion.png" in md


def test_imagenet_style_data_is_found_or_the_error_says_how(tree, tmp_path, monkeypatch):
    from bench import data

    monkeypatch.delenv("RESBENCH_DATA", raising=False)
    with pytest.raises(data.DataError, match=r"imagenette not found: no --data-root .* or add --download"):
        data.check("imagenette")
    with pytest.raises(data.DataError, match=r"holds 3 classes; imagenette has 10"):
        data.load_tree("imagenette", tree)
    with pytest.raises(data.DataError, match="decoded batch by batch"):
        data.load("imagenet", tree)  # never read into memory as the CIFAR-like sets are
    assert data.stem("imagenette", "resnet18") == "imagenet" and data.stem("cifar10", "resnet18") == "cifar"
    assert data.stem("imagenet", "resnet20") == "cifar"  # the CIFAR family has no other stem


def test_the_imagenet_recipe_fields_leave_earlier_run_ids_alone():
    from bench.specs import RunSpec, recipe

    # the id this spec had before ten_crop and lighting existed (the constant-lr smoke recipe of the references
    # before 2026-12)
    spec = RunSpec("resnet8", recipe("smoke", milestones=()), seed=0, width=0.5, sweep="smoke")
    assert spec.run_id == "resnet8-cifar10-smoke-s0-930bab7b93"
    for change in (dict(ten_crop=False), dict(lighting=True)):  # off their defaults, they enter the id
        base = RunSpec("resnet18", recipe("imagenette"), dataset="imagenette").run_id
        assert RunSpec("resnet18", recipe("imagenette", **change), dataset="imagenette").run_id != base, change
    r = recipe("he2015-imagenet")
    assert (r.batch_size, r.lr, r.momentum, r.weight_decay, r.ten_crop, r.val_size) == (256, 0.1, 0.9, 1e-4, True, 0)
    assert (r.iterations, r.milestones, r.eval_every, r.schedule_in) == (90, (30, 60), 1, "epochs")  # /10 at 30, 60
    assert r.lighting  # "the standard color augmentation in [21]"
    # in steps for the data found: ImageNet's 1,281,167 images give 5,004 steps of 256 an epoch
    steps = r.in_steps(1_281_167 // 256)
    assert (steps.iterations, steps.milestones, steps.eval_every) == (450_360, (150_120, 300_240), 5_004)
    assert steps.lr_at(150_119, 18) == 0.1 and steps.lr_at(150_120, 18) == pytest.approx(0.01)


def test_a_tree_is_fingerprinted_by_its_file_names_and_sizes(tree, tmp_path):
    import shutil

    from bench.sources import tree_fingerprint

    copy = tmp_path / tree.name
    shutil.copytree(tree, copy)
    assert tree_fingerprint(imf.scan(copy)) == tree_fingerprint(imf.scan(tree))  # where it lies does not count
    extra = copy / "train" / "n0100" / "n0100_0.JPEG"
    extra.write_bytes(extra.read_bytes() + b"\0")
    assert tree_fingerprint(imf.scan(copy)) != tree_fingerprint(imf.scan(tree))


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_the_decode_profile_times_the_pipeline_per_core_and_stays_out_of_the_grid(tree):
    from bench import profile as prof

    df = prof.decode_profile(tree, workers=(0,), seconds=0.3, log=lambda *_: None)
    row = df.iloc[0]
    assert (row["mode"], row["workers"], row["train_images"]) == ("decode", 0, 18)
    assert row["images"] >= 6 and row["img_per_s"] == pytest.approx(row["images"] / row["seconds"])
    assert row["img_per_s_per_core"] == row["img_per_s"] and "cpu" in df
    assert profile_tables.measurements(df).empty  # a decode rate is not a configuration of the training grid
    both = prof.decode_profile(tree, workers=(0, 1), seconds=0.2, device="cpu", batch_size=4, log=lambda *_: None)
    assert both[["decode_on", "workers", "decode_device"]].values.tolist() == [
        ["workers", 0, "cpu"], ["workers", 1, "cpu"], ["device", 1, "cpu"]]
    assert (both["batch_size"] == 4).all() and both["img_per_s_per_core"].isna().tolist() == [False, False, True]
    # timed on a random sample of the tree, whose images' sizes the rows say (the rate depends on them)
    files = [p for p in (tree / "train").rglob("*.JPEG")]
    assert (row["sampled_images"], row["mean_file_kb"]) == (18, pytest.approx(sum(p.stat().st_size for p in files)
                                                                               / len(files) / 1024))
    assert row["mean_megapixels"] == pytest.approx(sum((40 + 8 * i) * (60 - 4 * i) for i in range(6)) / 6 / 1e6)
    few = prof.decode_profile(tree, workers=(0,), seconds=0.1, batch_size=2, sample=5, log=lambda *_: None)
    assert (few["sampled_images"].iloc[0], few["train_images"].iloc[0]) == (5, 18)


def test_table_2_sets_the_runs_10_crop_error_beside_the_papers():
    import pandas as pd

    from bench.report import imagenet_table

    runs = pd.DataFrame([dict(status="ok", family="imagenet", kind="resnet", depth=34, dataset="imagenet",
                              final_test_err=0.30, final_test_err_10crop=e) for e in (0.26, 0.27)]
                        + [dict(status="ok", family="imagenet", kind="plain", depth=18, dataset="imagenette",
                                final_test_err=0.2, final_test_err_10crop=None),
                           dict(status="failed", family="imagenet", kind="plain", depth=34, dataset="imagenet",
                                final_test_err=0.9, final_test_err_10crop=0.9),
                           dict(status="ok", family="cifar", kind="resnet", depth=20, dataset="cifar10",
                                final_test_err=0.1, final_test_err_10crop=None)])
    table = imagenet_table(runs).set_index("net")
    assert list(table.index) == ["plain-18", "resnet-34"]
    r34 = table.loc["resnet-34"]
    assert (r34["test"], r34["n"], r34["He et al. %"], r34["difference"]) == ("10-crop", 2, "25.03", "+1.47")
    # 26 and 27: mean 26.5, sd 0.7071, t(0.975, 1 df) 12.706: 26.5 -+ 6.35
    assert r34["top-1 err % (mean [95 % CI])"] == "26.50 [20.15, 32.85]"
    p18 = table.loc["plain-18"]  # Imagenette: the centre crop, no published number
    assert (p18["test"], p18["He et al. %"], p18["top-1 err % (mean [95 % CI])"]) == ("centre crop", "-", "20.00")


def test_profile_decode_of_a_folder_without_a_tree_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main

    res = CliRunner().invoke(main, ["profile", "--decode", str(tmp_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("Error: no train/<class>/ folders under") and not (tmp_path / "out" / "profile").exists()


def test_an_epochs_order_is_drawn_once_per_epoch_not_per_batch(tree, monkeypatch):
    t = imf.scan(tree)
    loader = imf.StreamLoader(t.train, torch.zeros(3, imf.CROP, imf.CROP), batch_size=4, seed=3,
                              device=torch.device("cpu"), workers=0, rank=1, world=2)
    drawn, real = [], imf.epoch_order
    monkeypatch.setattr(imf, "epoch_order", lambda n, seed, epoch: drawn.append(epoch) or real(n, seed, epoch))
    keys = list(__import__("itertools").islice(loader._keys(3), 2 * 5))  # batches 3..7 (4 an epoch): epochs 0 and 1
    assert drawn == [0, 1] and len(keys) == 10  # batch 3 of epoch 0, then four of epoch 1: 2 draws
    # and they are the keys of the per-batch rule: rank 1's half of each batch of epoch e's order
    want = [(e, int(i)) for b in range(3, 8) for e, j in [divmod(b, 4)]
            for i in real(18, 3, e)[j * 4 + 2: j * 4 + 4]]
    assert keys == want


def test_a_split_is_two_arrays_and_a_scan_is_listed_once_until_a_folder_changes(tree, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    first = imf.scan(copy)
    assert isinstance(first.train.rel, np.ndarray) and first.train.labels.dtype == np.int32
    assert first.train[0] == imf.Item(str(copy / "train" / "n0100" / "n0100_0.JPEG"), 0)
    assert [i.label for i in first.train[::6]] == [0, 1, 2] and len(first.train.take([5, 0])) == 2
    monkeypatch.setattr(imf, "_scan_folder", lambda base: pytest.fail("listed again"))
    again = imf.scan(copy)  # from the cache
    assert again.classes == first.classes and [i.path for i in again.val] == [i.path for i in first.val]
    monkeypatch.undo()
    (copy / "train" / "n0200" / "n0200_0.JPEG").unlink()  # its class folder changes: listed again
    assert len(imf.scan(copy).train) == len(first.train) - 1


def test_the_papers_colour_augmentation_is_a_recorded_option_of_imagenet_style_runs_only(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main
    from bench.specs import RunSpec, recipe

    assert recipe("he2015-imagenet").lighting and not recipe("imagenette").lighting
    lit = RunSpec("resnet18", recipe("imagenette", lighting=True), dataset="imagenette")
    assert lit.run_id != RunSpec("resnet18", recipe("imagenette"), dataset="imagenette").run_id
    assert lit.flat()["lighting"] is True
    with pytest.raises(ValueError, match="lighting and ten_crop are for ImageNet-style data"):
        RunSpec("resnet20", recipe("smoke", lighting=True))
    (tmp_path / "c.toml").write_text("lighting = false\n")
    res = CliRunner().invoke(main, ["sweep", "--config", str(tmp_path / "c.toml"), "--preset", "he2015-imagenet",
                                    "--data-root", str(tmp_path / "none")])
    assert "unknown key" not in res.output and "imagenet not found" in res.output or "no train/" in res.output


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_check_data_decodes_every_file_once_and_lists_the_bad_ones(tree, tmp_path):
    import shutil

    from click.testing import CliRunner

    from bench.cli import main

    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    good = CliRunner().invoke(main, ["check-data", str(copy), "--workers", "0"])
    assert good.exit_code == 0 and "all 24 images" in good.output
    cut = copy / "val" / "n0200" / "n0200_1.JPEG"
    cut.write_bytes(cut.read_bytes()[:200])
    (copy / "train" / "n0300" / "junk.png").write_bytes(b"not a png")
    res = CliRunner().invoke(main, ["check-data", str(copy), "--workers", "2"])
    assert res.exit_code == 1 and "2 of 25 images cannot be decoded" in res.output
    assert f"{cut}: cannot decode {cut}" in res.output and "junk.png: cannot decode" in res.output


def test_the_first_failing_rank_is_the_one_whose_traceback_file_came_first(tmp_path):
    import os

    from bench import train

    folder = tmp_path / "errors"
    folder.mkdir()
    for rank, mtime, text in ((0, 200, "Traceback\nRuntimeError: Connection closed by peer"),
                              (1, 100, "Traceback\nImageFolderError: cannot decode x.JPEG")):
        f = folder / f"r.rank{rank}.err"
        f.write_text(text)
        os.utime(f, ns=(mtime * 10**9, mtime * 10**9))
    assert train.first_rank_error(tmp_path, "r", 2).startswith("rank 1 of 2 failed first: ImageFolderError: cannot decode")
    assert train.first_rank_error(tmp_path, "other", 2) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_decoding_waits_for_the_kernels_still_queued_on_the_stream(tree):
    """Tensors of the decoded images' sizes are read by kernels queued behind a long GPU sleep, then freed: the
    caching allocator may hand their memory to the decoder's outputs at once (same stream). If the decoder wrote
    before those kernels ran, their sums would change."""
    t = imf.scan(tree)
    paths = [i.path for i in t.train][:8]
    datas = [imf.read_bytes(p) for p in paths]
    cuda = torch.device("cuda")
    sizes = [imf.decode_data(d, p).numel() for d, p in zip(datas, paths)]
    for _ in range(3):
        blocks = [torch.full((n,), 7, dtype=torch.uint8, device=cuda) for n in sizes]
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # the stream busy for a while (GPU cycles)
        sums = [b.sum() for b in blocks]  # queued behind the sleep, reading the blocks
        del blocks  # their memory goes back to the stream's pool while the sums wait
        imgs = imf.decode_many(datas, paths, cuda)
        torch.cuda.synchronize()
        assert [int(s) for s in sums] == [7 * n for n in sizes]
        assert all(img.is_cuda for img in imgs)


def test_the_trees_fingerprint_is_stated_once_while_its_folders_are_unchanged(tree, tmp_path, monkeypatch):
    from bench import sources

    monkeypatch.setenv("RESBENCH_CACHE", str(tmp_path / "cache"))
    t = imf.scan(tree)
    calls = []
    real = os.path.getsize
    monkeypatch.setattr(os.path, "getsize", lambda p: calls.append(p) or real(p))
    first = imf.cached(t, "fingerprint", lambda: sources.tree_fingerprint(t))
    assert len(calls) == len(t.train) + len(t.val)  # one stat per file, the first time
    assert imf.cached(t, "fingerprint", lambda: sources.tree_fingerprint(t)) == first and len(calls) == len(t.train) + len(t.val)
    (tree / "train" / "n0100" / "new.JPEG").write_bytes((tree / "train" / "n0100" / "n0100_0.JPEG").read_bytes())
    try:
        again = imf.scan(tree)
        assert imf.cached(again, "fingerprint", lambda: sources.tree_fingerprint(again)) != first  # an image more
    finally:
        (tree / "train" / "n0100" / "new.JPEG").unlink()
