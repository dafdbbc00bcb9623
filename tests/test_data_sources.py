"""Caption sources: folder, manifests, webdataset shards, synthetic world, and ``open_source``.

References are independent of the code under test: fixtures are written here with PIL, the csv and
json modules, pyarrow, ``webdataset.TarWriter`` and plain ``tarfile``; expected images are decoded
from the written bytes with PIL and expected captions are the strings written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from clipforge.data.formats import shards as shard_reader
from clipforge.data.sources import (
    ConcatSource,
    FolderSource,
    ManifestSource,
    SyntheticSource,
    WebDatasetSource,
    open_source,
)
from clipforge.data.synthetic import SyntheticWorld, WorldConfig
from clipforge.errors import ConfigError, InputError


def random_image(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encoded(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def same_pixels(image: Image.Image, expected: Image.Image | bytes) -> bool:
    reference = Image.open(io.BytesIO(expected)) if isinstance(expected, bytes) else expected
    return np.array_equal(np.asarray(image.convert("RGB")), np.asarray(reference.convert("RGB")))


def load_error(source, index: int) -> str:
    with pytest.raises(InputError) as caught:
        source.load(index)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- folder --


def test_folder_pairs_images_with_sidecar_captions_recursively(tmp_path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    written = {"a.png": "a red circle", "b/deep/c.jpg": "two blue stars", "b/x.y.png": "a dotted name"}
    for index, (name, caption) in enumerate(written.items()):
        random_image(index).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(f"  {caption}\n")
    (tmp_path / "notes.txt").write_text("not a caption of anything")

    source = FolderSource(tmp_path)

    assert len(source) == 3
    assert [source.key(i) for i in range(3)] == sorted(written)
    for index in range(3):
        image, caption = source.load(index)
        assert caption == written[source.key(index)]
        assert same_pixels(image, Image.open(tmp_path / source.key(index)))


def test_folder_bad_samples_name_their_file_and_reason(tmp_path) -> None:
    random_image(0).save(tmp_path / "0_missing.png")
    random_image(1).save(tmp_path / "1_latin1.png")
    (tmp_path / "1_latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    random_image(2).save(tmp_path / "2_blank.png")
    (tmp_path / "2_blank.txt").write_text(" \n\t ")
    (tmp_path / "3_corrupt.png").write_bytes(encoded(random_image(3))[:40])
    (tmp_path / "3_corrupt.txt").write_text("fine caption")

    source = FolderSource(tmp_path)

    assert load_error(source, 0) == "0_missing.png: missing caption (no 0_missing.txt)"
    assert load_error(source, 1) == "1_latin1.png: caption is not UTF-8 (invalid byte at position 3)"
    assert load_error(source, 2) == "2_blank.png: empty caption"
    assert load_error(source, 3).startswith("3_corrupt.png: unreadable image (")


def test_folder_without_images_or_missing_is_an_input_error(tmp_path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match="no images found"):
        FolderSource(tmp_path)
    with pytest.raises(InputError, match="nowhere: no such folder"):
        FolderSource(tmp_path / "nowhere")


# -- manifests --


def _image_files(tmp_path, count: int) -> list[str]:
    (tmp_path / "img").mkdir()
    names = []
    for index in range(count):
        random_image(10 + index).save(tmp_path / "img" / f"{index}.png")
        names.append(f"img/{index}.png")
    return names


def test_csv_manifest_uses_open_clip_default_columns_and_keeps_captions_as_text(tmp_path) -> None:
    names = _image_files(tmp_path, 3)
    captions = ["a cat, sitting", '007', 'she said "hi"']
    with open(tmp_path / "train.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "filepath", "title"])
        writer.writerows([index, name, caption] for index, (name, caption) in enumerate(zip(names, captions)))

    source = ManifestSource(tmp_path / "train.csv")

    assert (source.image_column, source.caption_column) == ("filepath", "title")
    assert [source.key(i) for i in range(3)] == names
    for index in range(3):
        image, caption = source.load(index)
        assert caption == captions[index]
        assert same_pixels(image, Image.open(tmp_path / names[index]))


def test_tsv_manifest_does_not_treat_quotes_specially_and_honours_root(tmp_path) -> None:
    names = _image_files(tmp_path, 2)
    (tmp_path / "lists").mkdir()
    captions = ['a 12" record', "plain"]
    lines = ["image\tcaption"] + [f"{name}\t{caption}" for name, caption in zip(names, captions)]
    (tmp_path / "lists" / "pairs.tsv").write_text("\n".join(lines) + "\n")

    source = ManifestSource(tmp_path / "lists" / "pairs.tsv", root=tmp_path)

    assert [source.load(i)[1] for i in range(2)] == captions
    relative_to_manifest = ManifestSource(tmp_path / "lists" / "pairs.tsv")
    assert load_error(relative_to_manifest, 0).startswith("img/0.png: unreadable image (")


def test_parquet_manifest_with_text_column_absolute_paths_and_image_bytes(tmp_path) -> None:
    names = _image_files(tmp_path, 2)
    absolute = [str(tmp_path / name) for name in names]
    pq.write_table(pa.table({"path": absolute, "text": ["first", "second"]}), tmp_path / "m.parquet")
    source = ManifestSource(tmp_path / "m.parquet")
    assert source.key(1) == absolute[1]
    assert source.load(1)[1] == "second"
    assert same_pixels(source.load(1)[0], Image.open(absolute[1]))

    blobs = [encoded(random_image(5), "JPEG"), None]
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "caption": ["jpeg bytes", "none"]}), tmp_path / "b.parquet")
    inline = ManifestSource(tmp_path / "b.parquet")
    image, caption = inline.load(0)
    assert caption == "jpeg bytes" and same_pixels(image, blobs[0])
    assert inline.key(0) == "b.parquet row 0"
    assert load_error(inline, 1) == "b.parquet row 1: missing image (no 'image' value)"


def test_jsonl_manifest_missing_field_is_a_missing_caption(tmp_path) -> None:
    names = _image_files(tmp_path, 3)
    rows = [{"image": names[0], "caption": "one"}, {"image": names[1]}, {"image": names[2], "caption": "three"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")

    source = ManifestSource(tmp_path / "m.jsonl")

    assert source.load(0)[1] == "one" and source.load(2)[1] == "three"
    assert load_error(source, 1) == "img/1.png: missing caption (no 'caption' value)"


def test_manifest_column_errors_list_the_columns_found(tmp_path) -> None:
    (tmp_path / "m.csv").write_text("url,alt_text,width\nx.png,hello,3\n")
    with pytest.raises(ConfigError) as caught:
        ManifestSource(tmp_path / "m.csv")
    message = str(caught.value)
    assert "no image column" in message and "found columns: url, alt_text, width" in message
    assert "--image-column" in message and "image_column" not in message  # the option's spelling, not a field's

    with pytest.raises(ConfigError, match="no caption column 'label'; found columns: url, alt_text, width"):
        ManifestSource(tmp_path / "m.csv", image_column="url", caption_column="label")
    chosen = ManifestSource(tmp_path / "m.csv", image_column="url", caption_column="alt_text")
    assert chosen.key(0) == "x.png"

    (tmp_path / "lists.jsonl").write_text(json.dumps({"image": "x.png", "caption": ["a", "b"]}) + "\n")
    with pytest.raises(ConfigError, match="column 'caption' holds list"):
        ManifestSource(tmp_path / "lists.jsonl")


def test_empty_or_unparsable_manifest_is_an_input_error(tmp_path) -> None:
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(InputError, match="empty.csv: the manifest has no rows"):
        ManifestSource(tmp_path / "empty.csv")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": \n')
    with pytest.raises(InputError, match="bad.jsonl: cannot parse manifest"):
        ManifestSource(tmp_path / "bad.jsonl")


# -- webdataset shards --


def write_wds_shard(path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def good_wds_samples(prefix: str, count: int, seed: int) -> list[dict]:
    return [
        {
            "__key__": f"{prefix}{index:04d}",
            "jpg": encoded(random_image(seed + index), "JPEG"),
            "txt": f"caption {prefix} {index}".encode(),
            "json": json.dumps({"key": index}).encode(),
        }
        for index in range(count)
    ]


def test_webdataset_shards_by_brace_pattern_read_like_the_written_bytes(tmp_path) -> None:
    shards = [good_wds_samples(f"{s}", 4, 100 * s) for s in range(3)]
    for index, samples in enumerate(shards):
        write_wds_shard(tmp_path / f"{index:05d}.tar", samples)

    source = WebDatasetSource(str(tmp_path / "{00000..00002}.tar"))

    flat = [(index, sample) for index, samples in enumerate(shards) for sample in samples]
    assert len(source) == 12 and source.dropped == []
    for position, (shard, sample) in enumerate(flat):
        assert source.key(position) == f"{tmp_path / f'{shard:05d}.tar'}:{sample['__key__']}"
        image, caption = source.load(position)
        assert caption == sample["txt"].decode()
        assert same_pixels(image, sample["jpg"])
    with pytest.raises(IndexError):
        source.load(12)


def test_plain_tar_shard_groups_members_by_first_dot_of_basename(tmp_path) -> None:
    members = [
        ("dir.v2/a.PNG", encoded(random_image(1))),
        ("dir.v2/a.txt", b"caption a"),
        ("dir.v2/a.syn.json", b"{}"),
        ("b.webp", encoded(random_image(2), "WEBP")),
        ("c.txt", b"caption without image"),
        ("b.txt", b"caption b"),
        ("README", b"no extension, ignored"),
        ("d.json", b"{}"),
    ]
    with tarfile.open(tmp_path / "plain.tar", "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

    source = WebDatasetSource([str(tmp_path / "plain.tar")])

    keys = [source.key(i).rsplit(":", 1)[1] for i in range(len(source))]
    assert keys == ["dir.v2/a", "b", "c"]
    image, caption = source.load(0)
    assert caption == "caption a" and same_pixels(image, members[0][1])
    assert source.load(1)[1] == "caption b"
    assert load_error(source, 2).endswith(":c: missing image (no .jpg, .jpeg, .png, .webp, .bmp, .gif, .tif or .tiff member)")


def test_missing_unreadable_and_empty_shards(tmp_path) -> None:
    write_wds_shard(tmp_path / "good.tar", good_wds_samples("g", 2, 0))
    with pytest.raises(InputError, match=r"lost\.tar: no such shard"):
        WebDatasetSource(f"{tmp_path / 'good.tar'}::{tmp_path / 'lost.tar'}")
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(InputError, match=r"junk\.tar: not a readable uncompressed tar shard"):
        WebDatasetSource([str(tmp_path / "junk.tar")])

    (tmp_path / "zero.tar").write_bytes(b"")
    write_wds_shard(tmp_path / "nomembers.tar", [])
    source = WebDatasetSource([str(tmp_path / name) for name in ("zero.tar", "good.tar", "nomembers.tar")])
    assert len(source) == 2
    assert source.dropped == [(str(tmp_path / "zero.tar"), "empty shard"), (str(tmp_path / "nomembers.tar"), "empty shard")]
    with pytest.raises(InputError, match="every one of the 2 shards is empty"):
        WebDatasetSource([str(tmp_path / "zero.tar"), str(tmp_path / "nomembers.tar")])


def test_offset_index_is_cached_reused_and_rebuilt_when_the_shard_changes(tmp_path, monkeypatch) -> None:
    scans = []
    real_scan = shard_reader.scan_tar
    monkeypatch.setattr(shard_reader, "scan_tar", lambda shard: scans.append(shard) or real_scan(shard))
    shard = tmp_path / "00000.tar"
    write_wds_shard(shard, good_wds_samples("a", 3, 0))

    assert len(WebDatasetSource([str(shard)])) == 3
    assert scans == [shard]
    assert (tmp_path / ".00000.tar.offsets.parquet").is_file()
    assert len(WebDatasetSource([str(shard)])) == 3
    assert scans == [shard]  # fresh cache: no rescan

    replacement = good_wds_samples("b", 5, 50)
    write_wds_shard(shard, replacement)
    source = WebDatasetSource([str(shard)])
    assert len(scans) == 2 and len(source) == 5
    assert source.load(4)[1] == "caption b 4" and same_pixels(source.load(4)[0], replacement[4]["jpg"])

    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same size, newer mtime
    WebDatasetSource([str(shard)])
    assert len(scans) == 3


def test_unwritable_shard_folder_still_works_without_a_cache(tmp_path, monkeypatch) -> None:
    write_wds_shard(tmp_path / "s.tar", good_wds_samples("r", 2, 0))

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shard_reader, "atomic_path", refuse)
    source = WebDatasetSource([str(tmp_path / "s.tar")])
    assert source.load(1)[1] == "caption r 1"
    assert not (tmp_path / ".s.tar.offsets.parquet").exists()


# -- synthetic and open_source --


def test_synthetic_source_is_the_world_sample_by_sample() -> None:
    config = WorldConfig(seed=3, image_size=32)
    source = SyntheticSource(SyntheticWorld(config), "val", length=5)
    reference = SyntheticWorld(config)
    assert len(source) == 5 and source.key(4) == "synthetic/val/4"
    for index in (0, 4):
        image, caption = source.load(index)
        sample = reference.sample("val", index)
        assert caption == sample.caption and same_pixels(image, sample.image)
    with pytest.raises(ConfigError, match="split 'nope'"):
        SyntheticSource(reference, "nope", 5)


def test_open_source_recognises_every_kind_of_spec(tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    random_image(0).save(folder / "p.png")
    (folder / "p.txt").write_text("a photo")
    (tmp_path / "m.csv").write_text("image,caption\nphotos/p.png,from the manifest\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(2):
        write_wds_shard(shards / f"{index:05d}.tar", good_wds_samples(f"{index}", 2, index))

    assert isinstance(open_source(str(folder)), FolderSource)
    assert isinstance(open_source(tmp_path / "m.csv"), ManifestSource)
    by_folder = open_source(str(shards))
    assert isinstance(by_folder, WebDatasetSource) and len(by_folder) == 4
    assert len(open_source(f"{shards}/{{00000..00001}}.tar")) == 4
    assert len(open_source(f"{shards}/00000.tar::{shards}/00001.tar")) == 4

    mixed = open_source(f"{folder}::{tmp_path / 'm.csv'}")
    assert isinstance(mixed, ConcatSource) and len(mixed) == 2
    assert [mixed.load(i)[1] for i in range(2)] == ["a photo", "from the manifest"]
    assert mixed.key(1) == "photos/p.png"

    synthetic = open_source({"type": "synthetic", "length": 7, "seed": 2, "image_size": 32})
    assert len(synthetic) == 7 and synthetic.load(0)[0].size == (32, 32)
    assert len(open_source("synthetic")) == 100_000
    assert len(open_source({"type": "manifest", "path": str(tmp_path / "m.csv")})) == 1


def test_open_source_rejects_bad_specs_with_one_line(tmp_path) -> None:
    with pytest.raises(InputError, match="nothing-here: no such file or folder"):
        open_source(str(tmp_path / "nothing-here"))
    (tmp_path / "data.xlsx").write_text("")
    with pytest.raises(ConfigError, match="not a data source"):
        open_source(str(tmp_path / "data.xlsx"))
    with pytest.raises(ConfigError, match="type 'lmdb' is not one of folder, manifest, webdataset, synthetic"):
        open_source({"type": "lmdb"})
    with pytest.raises(ConfigError, match="data source 'folder'"):
        open_source({"type": "folder", "root": str(tmp_path), "recursive": True})
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        open_source({"type": "synthetic", "colour": "red"})
