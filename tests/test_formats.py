"""One reader layer (``clipforge.data.formats``): a file reads the same through training, evaluation and embedding.

The same captions are written as CSV (``csv`` module), TSV (by hand, img2dataset's unquoted layout),
parquet (pyarrow), JSONL (``json``), a webdataset shard (``tarfile``) and a folder with ``.txt``
sidecars, then read through each entry point. The expectation is written out here: for CSV, parquet
and JSONL the strings written; for TSV the text between the tabs, quotes included; for ``.txt``
files and members the text after the UTF-8 byte-order mark.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipforge.data.formats import shards as shard_reader
from clipforge.data.formats.images import read_image, read_rgb_image
from clipforge.data.formats.shards import ShardMember, offset_index_path, shard_index
from clipforge.data.sources import ManifestSource, open_source
from clipforge.errors import ConfigError, InputError
from clipforge.eval.datasets import (
    load_dataset,
    load_retrieval_dataset,
    table_dataset,
    webdataset_dataset,
)
from clipforge.retrieval.inputs import (
    ImageItem,
    folder_items,
    manifest_items,
    shard_items,
)

CAPTIONS = ['"Big" sale, 2 for 1', "a cat, sitting on a mat", "café crème brûlée, 東京", "starts with a byte-order mark"]
EXPECTED = ['"Big" sale, 2 for 1', "a cat, sitting on a mat", "café crème brûlée, 東京", "starts with a byte-order mark"]
BOM = b"\xef\xbb\xbf"
TABLES = ("captions.csv", "captions.tsv", "captions.parquet", "captions.jsonl")


def png(index: int) -> bytes:
    pixels = np.random.default_rng(index).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def caption_file_bytes(index: int) -> bytes:
    """The ``.txt`` content of caption ``index``: the last one starts with a UTF-8 byte-order mark."""
    data = CAPTIONS[index].encode()
    return BOM + data if index == len(CAPTIONS) - 1 else data


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture()
def written(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "folder").mkdir()
    for index in range(len(CAPTIONS)):
        (tmp_path / "img" / f"{index}.png").write_bytes(png(index))
        (tmp_path / "folder" / f"{index}.png").write_bytes(png(index))
        (tmp_path / "folder" / f"{index}.txt").write_bytes(caption_file_bytes(index))
    rows = [(f"img/{index}.png", caption) for index, caption in enumerate(CAPTIONS)]
    with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8-sig") as stream:  # as Excel writes it
        csv.writer(stream).writerows([("image", "caption"), *rows])
    tsv = "image\tcaption\n" + "".join(f"{image}\t{caption}\n" for image, caption in rows)
    (tmp_path / "captions.tsv").write_bytes(BOM + tsv.encode())
    pq.write_table(pa.table({"image": [r[0] for r in rows], "caption": [r[1] for r in rows]}), tmp_path / "captions.parquet")
    jsonl = "".join(json.dumps({"image": image, "caption": caption}) + "\n" for image, caption in rows)
    (tmp_path / "captions.jsonl").write_text(jsonl, encoding="utf-8")
    with tarfile.open(tmp_path / "captions.tar", "w") as archive:
        for index in range(len(CAPTIONS)):
            add_member(archive, f"s{index:03d}.png", png(index))
            add_member(archive, f"s{index:03d}.txt", caption_file_bytes(index))
            add_member(archive, f"s{index:03d}.json", json.dumps({"caption": CAPTIONS[index]}).encode())
    return tmp_path


def same_pixels(image: Image.Image, index: int) -> bool:
    return np.array_equal(np.asarray(image.convert("RGB")), np.asarray(Image.open(io.BytesIO(png(index))).convert("RGB")))


@pytest.mark.parametrize("name", [*TABLES, "captions.tar", "folder"])
def test_every_entry_point_reads_the_same_captions(written, name) -> None:
    path = written / name
    source = open_source(str(path))
    training = [source.load(index)[1] for index in range(len(source))]
    evaluation = [captions[0] for captions in load_retrieval_dataset(str(path)).captions]
    if name == "folder":
        items = folder_items(path, captions=True)
    elif name.endswith(".tar"):
        items = shard_items(path, captions=True)
    else:
        items = manifest_items(path)
    embedding = [item.caption for item in items]

    assert training == EXPECTED
    assert evaluation == EXPECTED
    assert embedding == EXPECTED


def test_folder_images_come_in_one_order_everywhere(tmp_path) -> None:
    names = ["2023.png", "2023-party.png", "2023/x.png", "B.PNG", "a.jpeg"]
    for index, name in enumerate(names):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(png(index))
        (tmp_path / name).with_suffix(".txt").write_text(f"picture {name}")
    expected = ["2023/x.png", "2023-party.png", "2023.png", "B.PNG", "a.jpeg"]  # by path components, then bytes

    source = open_source(str(tmp_path))
    assert [source.key(index) for index in range(len(source))] == expected
    assert [Path(image).relative_to(tmp_path).as_posix() for image in load_retrieval_dataset(str(tmp_path)).images] == expected
    assert [Path(item.path).relative_to(tmp_path).as_posix() for item in folder_items(tmp_path)] == expected


@pytest.mark.parametrize("name", [*TABLES, "captions.tar"])
def test_captions_as_class_labels_read_the_same_in_evaluation(written, name) -> None:
    options = {"class_field": "txt"} if name.endswith(".tar") else {"label_column": "caption"}
    dataset = load_dataset(str(written / name), **options)
    assert [dataset.classnames[label] for label in dataset.labels] == EXPECTED


def test_shard_images_are_one_member_reference_read_alike_everywhere(written) -> None:
    shard = written / "captions.tar"
    training = open_source(str(shard))
    retrieval = load_retrieval_dataset(str(shard))
    items = shard_items(shard)
    assert all(isinstance(image, ShardMember) for image in retrieval.images)
    for index in range(len(CAPTIONS)):
        assert same_pixels(training.load(index)[0], index)
        assert same_pixels(read_rgb_image(retrieval.images[index]), index)
        assert same_pixels(read_image(ImageItem.from_metadata(items[index].metadata()).image_source()), index)


def test_shard_index_reads_every_field_by_webdataset_key_rule(tmp_path) -> None:
    members = [("dir.v2/a.PNG", png(1)), ("dir.v2/a.cls", b"3"), ("dir.v2/a.syn.json", b"{}"), ("b.json", b'{"k": 1}'),
               ("README", b"no dot: not a sample"), ("dir.v2/a.png", b"second copy, ignored")]
    with tarfile.open(tmp_path / "s.tar", "w") as archive:
        for name, data in members:
            add_member(archive, name, data)
    index = shard_index(tmp_path / "s.tar")
    assert index.keys == ["dir.v2/a", "b"]
    assert index.read(0, "png") == png(1) and index.read(0, "cls") == b"3" and index.read(0, "syn.json") == b"{}"
    assert index.read(1, "json") == b'{"k": 1}' and index.read(1, "txt") is None and index.image(1) is None
    assert index.image(0) == ShardMember(str(tmp_path / "s.tar"), "dir.v2/a", index.image(0).offset, len(png(1)))
    assert index.samples_with(("cls",)) == [0] and index.label(1) == f"{tmp_path / 's.tar'}:b"


def test_an_index_cached_by_an_older_version_is_rebuilt(tmp_path, monkeypatch) -> None:
    with tarfile.open(tmp_path / "s.tar", "w") as archive:
        add_member(archive, "k.jpg", png(0))
        add_member(archive, "k.cls", b"1")
    stat = (tmp_path / "s.tar").stat()
    old = {b"version": b"1", b"size": str(stat.st_size).encode(), b"mtime_ns": str(stat.st_mtime_ns).encode()}
    table = pa.table({"keys": ["k"], "image_offsets": [512], "image_sizes": [len(png(0))],
                      "caption_offsets": [-1], "caption_sizes": [0]})
    pq.write_table(table.replace_schema_metadata(old), offset_index_path(tmp_path / "s.tar"))
    scans = []
    real_scan = shard_reader.scan_tar
    monkeypatch.setattr(shard_reader, "scan_tar", lambda shard: scans.append(shard) or real_scan(shard))
    assert shard_index(tmp_path / "s.tar").read(0, "cls") == b"1"
    assert scans == [tmp_path / "s.tar"]
    assert shard_index(tmp_path / "s.tar").read(0, "cls") == b"1" and len(scans) == 1  # the new cache is used


def test_webdataset_classes_come_from_cls_members_without_holding_the_shard(tmp_path) -> None:
    with tarfile.open(tmp_path / "set-0.tar", "w") as archive:
        for index, label in enumerate(["cat", "\ufeffdog", "cat"]):
            add_member(archive, f"s{index}.webp", png(index))  # wrong extension on purpose: decoding sniffs the format
            add_member(archive, f"s{index}.cls", label.encode())
    dataset = webdataset_dataset(str(tmp_path / "set-{0..0}.tar"))
    assert dataset.classnames == ["cat", "dog"] and dataset.labels == [0, 1, 0]
    assert [image.key for image in dataset.images] == ["s0", "s1", "s2"]
    assert same_pixels(read_image(dataset.images[2]), 2)


def test_image_structs_and_bytes_columns_read_alike_in_training_and_evaluation(tmp_path) -> None:
    (tmp_path / "b.png").write_bytes(png(1))
    structs = [{"bytes": png(0), "path": "a.png"}, {"bytes": None, "path": "b.png"}]
    pq.write_table(pa.table({"image": structs, "caption": ["first", "second"], "label": ["x", "y"]}), tmp_path / "hf.parquet")
    training = ManifestSource(tmp_path / "hf.parquet")
    assert [training.key(i) for i in range(2)] == ["a.png", "b.png"]
    assert same_pixels(training.load(0)[0], 0) and same_pixels(training.load(1)[0], 1)
    evaluation = table_dataset(tmp_path / "hf.parquet")
    assert same_pixels(read_image(evaluation.images[0]), 0) and evaluation.images[1] == tmp_path / "b.png"
    with pytest.raises(InputError, match=r"hf\.parquet: column 'image' holds image bytes; a store needs image files"):
        manifest_items(tmp_path / "hf.parquet")


def test_table_errors_are_one_line_naming_the_file_and_column(tmp_path) -> None:
    (tmp_path / "t.tsv").write_text("image\tcaption\nimg/0.png\ta caption\n")
    with pytest.raises(ConfigError) as caught:
        load_dataset(str(tmp_path / "t.tsv"), label_column="class")
    assert str(caught.value) == f"{tmp_path / 't.tsv'}: no label column 'class'; found columns: image, caption"
    (tmp_path / "e.csv").write_text("image,caption\nimg/0.png,   \n")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "0.png")  # the image exists: the caption is what is wrong
    for read in (lambda: load_retrieval_dataset(str(tmp_path / "e.csv")), lambda: manifest_items(tmp_path / "e.csv")):
        with pytest.raises(InputError, match=r"e\.csv row \d: empty caption$"):
            read()


def test_a_truncated_shard_member_is_one_line_naming_the_sample(tmp_path) -> None:
    member = ShardMember(str(tmp_path / "gone.tar"), "k", 0, 10)
    with pytest.raises(InputError, match=r"gone\.tar:k: cannot read \("):
        read_image(member)
    (tmp_path / "short.tar").write_bytes(b"12345")
    with pytest.raises(InputError, match=r"short\.tar:k: truncated shard \(the file ends before byte 10\)$"):
        read_image(ShardMember(str(tmp_path / "short.tar"), "k", 0, 10))
