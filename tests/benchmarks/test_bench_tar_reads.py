"""Micro-benchmark of reading images out of an ImageNet-style archive (pytest-benchmark; deselected by default):

    pytest -m benchmark tests/benchmarks/test_bench_tar_reads.py --benchmark-only

A tree of 100,000 files of 1 KiB (100 classes; made-up bytes: only the reading is timed, no decoding), as loose
files and as one uncompressed tar of the same members; 2,000 random members read from each, three ways:
tarfile's own lookup (``TarFile.extractfile(name)``, what resbench did before: it searches the member list),
one ``pread`` per member at the offset the scan recorded (``Items.read``, what it does now), and the loose
files. results/reference-tar-reads-cpu holds the measurement.
"""
import io
import tarfile

import numpy as np
import pytest

from bench import imagefolder as imf

pytestmark = [pytest.mark.benchmark, pytest.mark.slow]  # timings, never in the fast loop
FILES, CLASSES, SIZE, READS = 100_000, 100, 1024, 2_000


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("tar-reads")
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, SIZE * 64, dtype=np.uint8).tobytes()
    names = [f"train/c{i % CLASSES:03d}/{i:06d}.JPEG" for i in range(FILES)] + \
            [f"val/c{c:03d}/v{c}.JPEG" for c in range(CLASSES)]
    archive = root / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        for k, name in enumerate(names):
            data = blob[(k % 63) * SIZE:(k % 63 + 1) * SIZE]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            path = root / "loose" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    picks = np.random.default_rng(1).choice(FILES, READS, replace=False)
    return archive, root / "loose", picks


def test_tarfile_lookup(benchmark, trees):
    archive, _, picks = trees
    t = imf.scan(archive)
    names = [t.train.path(int(i)).split("::", 1)[1] for i in picks]
    with tarfile.open(archive, "r:*") as tar:
        tar.getmembers()  # the member list read once, as a long-lived worker would have it

        def reads():
            return sum(len(tar.extractfile(n).read()) for n in names)

        assert benchmark.pedantic(reads, rounds=3, iterations=1) == READS * SIZE
    benchmark.extra_info.update(files=FILES, reads=READS, size=SIZE, how="TarFile.extractfile(name)")


def test_pread_at_the_scanned_offset(benchmark, trees):
    archive, _, picks = trees
    items = imf.scan(archive).train
    assert items.spans is not None

    def reads():
        return sum(len(items.read(int(i))) for i in picks)

    assert benchmark.pedantic(reads, rounds=3, iterations=1) == READS * SIZE
    benchmark.extra_info.update(files=FILES, reads=READS, size=SIZE, how="Items.read: os.pread at the scanned offset")


def test_loose_files(benchmark, trees):
    _, loose, picks = trees
    items = imf.scan(loose).train

    def reads():
        return sum(len(items.read(int(i))) for i in picks)

    assert benchmark.pedantic(reads, rounds=3, iterations=1) == READS * SIZE
    benchmark.extra_info.update(files=FILES, reads=READS, size=SIZE, how="open + read of each file")


def test_opening_the_archive(benchmark, trees):
    """What a worker paid before its first image: tarfile reading every member header (no cache)."""
    archive, _, _ = trees

    def members():
        with tarfile.open(archive, "r:*") as tar:
            return len(tar.getmembers())

    assert benchmark.pedantic(members, rounds=3, iterations=1) == FILES + CLASSES
    benchmark.extra_info.update(files=FILES, how="tarfile.open + getmembers")
