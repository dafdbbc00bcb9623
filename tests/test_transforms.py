"""Preprocessing parity with open_clip (eval and train) on real photos in every PIL mode we meet."""

import io
import json

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from open_clip import constants as oc_constants
from open_clip.transform import image_transform as open_clip_image_transform
from PIL import Image
from skimage import data
from torchvision.transforms import ColorJitter as TorchvisionColorJitter
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from clipforge.errors import ConfigError
from clipforge.preprocess import transforms
from clipforge.preprocess.transforms import (
    EvalTransform,
    PreprocessConfig,
    TrainTransform,
    image_transform,
)

TOLERANCE = 1e-6

# PIL says this when a transparent palette image is converted to RGB, for open_clip and for us alike.
pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")


def _palette_with_transparency(rgba: Image.Image) -> Image.Image:
    """A P-mode image with a tRNS chunk, as a PNG decoder hands it over."""
    buffer = io.BytesIO()
    rgba.quantize(64).save(buffer, "PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    image.load()
    assert image.mode == "P" and "transparency" in image.info
    return image


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """scikit-image's sample photos (various sizes and aspect ratios) plus palette/CMYK/1-bit variants (16-bit
    grayscale is the one documented deviation from open_clip: see ``test_sixteen_bit_grayscale_is_its_8_bit_twin``)."""
    rgb = {name: Image.fromarray(getattr(data, name)()) for name in
           ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")}
    gray = {name: Image.fromarray(getattr(data, name)()) for name in ("camera", "page", "text")}
    logo = Image.fromarray(data.logo())
    images = {
        **rgb,
        **gray,
        "logo_rgba": logo,
        "logo_la": logo.convert("LA"),
        "logo_palette_transparent": _palette_with_transparency(logo),
        "logo_palette_rgba": logo.quantize(64),
        "coffee_palette": rgb["coffee"].convert("P", palette=Image.Palette.ADAPTIVE, colors=200),
        "chelsea_palette_web": rgb["chelsea"].convert("P"),
        "rocket_cmyk": rgb["rocket"].convert("CMYK"),
        "horse_1bit": Image.fromarray(data.horse()),
        "coffee_portrait": rgb["coffee"].transpose(Image.Transpose.ROTATE_90),
        "astronaut_225x224": rgb["astronaut"].crop((0, 0, 225, 224)),  # center-crop offset 0.5: half-to-even
        "astronaut_448x101": rgb["astronaut"].crop((0, 0, 448, 101)),  # letterbox height 50.5: half-to-even
        "chelsea_strip_7x300": rgb["chelsea"].crop((100, 0, 107, 300)),  # extreme ratio: odd letterbox padding
    }
    modes = {image.mode for image in images.values()}
    assert {"RGB", "L", "RGBA", "LA", "P", "CMYK", "1"} <= modes
    return images


def _assert_same(reference: torch.Tensor, ours: torch.Tensor, what: str) -> None:
    assert ours.dtype == torch.float32 and ours.is_contiguous(), what
    assert ours.shape == reference.shape, what
    difference = (reference - ours).abs().max().item()
    assert difference <= TOLERANCE, f"{what}: max abs diff {difference}"


def test_constants_match_open_clip():
    assert transforms.OPENAI_DATASET_MEAN == oc_constants.OPENAI_DATASET_MEAN
    assert transforms.OPENAI_DATASET_STD == oc_constants.OPENAI_DATASET_STD
    assert transforms.IMAGENET_MEAN == oc_constants.IMAGENET_MEAN
    assert transforms.IMAGENET_STD == oc_constants.IMAGENET_STD
    assert transforms.INCEPTION_MEAN == oc_constants.INCEPTION_MEAN
    assert transforms.INCEPTION_STD == oc_constants.INCEPTION_STD


def test_eval_matches_open_clip_vit_b_32_preprocess(photos):
    _, _, reference = open_clip.create_model_and_transforms("ViT-B-32")
    ours = image_transform(PreprocessConfig(), train=False)
    assert isinstance(ours, EvalTransform)
    for name, image in photos.items():
        expected = reference(image)
        assert expected.shape == (3, 224, 224)
        _assert_same(expected, ours(image), name)


@pytest.mark.parametrize(
    ("resize_mode", "size", "interpolation", "fill_color", "mean", "std"),
    [
        ("shortest", 64, "bilinear", 0, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
        ("shortest", 336, "bicubic", 0, transforms.OPENAI_DATASET_MEAN, transforms.OPENAI_DATASET_STD),
        ("longest", 224, "bicubic", 0, transforms.OPENAI_DATASET_MEAN, transforms.OPENAI_DATASET_STD),
        ("longest", 336, "bilinear", 128, transforms.INCEPTION_MEAN, transforms.INCEPTION_STD),
        ("longest", 64, "bicubic", 255, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
        ("squash", 64, "bicubic", 0, transforms.INCEPTION_MEAN, transforms.INCEPTION_STD),
        ("squash", 336, "bilinear", 0, transforms.OPENAI_DATASET_MEAN, transforms.OPENAI_DATASET_STD),
    ],
)
def test_eval_matches_open_clip_image_transform(photos, resize_mode, size, interpolation, fill_color, mean, std):
    reference = open_clip_image_transform(
        size, is_train=False, mean=mean, std=std, resize_mode=resize_mode,
        interpolation=interpolation, fill_color=fill_color,
    )
    cfg = PreprocessConfig(size=size, mean=mean, std=std, interpolation=interpolation,
                           resize_mode=resize_mode, fill_color=fill_color)
    ours = EvalTransform(cfg)
    for name, image in photos.items():
        expected = reference(image)
        assert expected.shape == (3, size, size)
        _assert_same(expected, ours(image), f"{name} {cfg}")


def test_sixteen_bit_grayscale_is_its_8_bit_twin(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) gives exactly the tensors of the same picture saved at 8 bits, where
    open_clip clips every value above 255 to white; an ``I`` image of 8-bit values is its ``L`` twin."""
    from clipforge._util.imageio import open_image

    camera = data.camera()
    Image.fromarray(camera.astype(np.uint16) * 257).save(tmp_path / "camera16.png")
    sixteen = open_image(tmp_path / "camera16.png")
    assert sixteen.mode.startswith("I")
    twin = Image.fromarray(camera)
    cfg = PreprocessConfig(size=64)
    assert torch.equal(EvalTransform(cfg)(sixteen), EvalTransform(cfg)(twin))
    train = image_transform(cfg, train=True)
    assert torch.equal(train(sixteen, torch.Generator().manual_seed(1)), train(twin, torch.Generator().manual_seed(1)))
    clipped = open_clip_image_transform(64, is_train=False)(sixteen)
    assert (clipped - EvalTransform(cfg)(twin)).abs().max() > 0.5  # what open_clip gives instead: mostly white
    as_int = Image.fromarray(camera.astype(np.int32))
    assert as_int.mode == "I" and torch.equal(EvalTransform(cfg)(as_int), EvalTransform(cfg)(twin))


def test_letterbox_fill_reaches_the_border():
    """Hand-computed: a 10x40 white image letterboxed to 8x8 is 2 white columns between 3+3 fill columns."""
    cfg = PreprocessConfig(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize_mode="longest", fill_color=51)
    pixels = EvalTransform(cfg)(Image.new("RGB", (10, 40), (255, 255, 255)))
    expected = torch.full((3, 8, 8), 51 / 255)
    expected[:, :, 3:5] = 1.0
    torch.testing.assert_close(pixels, expected, rtol=0, atol=TOLERANCE)


# -- PreprocessConfig -------------------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = PreprocessConfig(size=336, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD,
                           interpolation="bilinear", resize_mode="longest", fill_color=114)
    restored = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert restored.mean == (0.485, 0.456, 0.406) and isinstance(restored.mean, tuple)
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()
    assert PreprocessConfig().to_dict() == {
        "size": 224, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
    }


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"size": 0}, "preprocess.size"),
        ({"size": "224"}, "preprocess.size"),
        ({"size": True}, "preprocess.size"),
        ({"mean": [0.5, 0.5]}, "preprocess.mean"),
        ({"mean": "abc"}, "preprocess.mean"),
        ({"std": [0.5, 0.0, 0.5]}, "preprocess.std"),
        ({"std": [0.5, float("nan"), 0.5]}, "preprocess.std"),
        ({"interpolation": "nearest"}, "preprocess.interpolation"),
        ({"resize_mode": "crop"}, "preprocess.resize_mode"),
        ({"fill_color": 256}, "preprocess.fill_color"),
        ({"fill_color": 1.5}, "preprocess.fill_color"),
        ({"crop_pct": 0.9}, "preprocess.crop_pct"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(values, field):
    with pytest.raises(ConfigError) as error:
        PreprocessConfig.from_dict(values)
    message = str(error.value)
    assert message.startswith(f"{field}:") and "\n" not in message


def test_config_rejects_non_mapping():
    with pytest.raises(ConfigError, match="^preprocess:"):
        PreprocessConfig.from_dict([("size", 224)])


# -- TrainTransform ---------------------------------------------------------------------------


def test_train_matches_open_clip_train_transform(photos):
    """open_clip's train transform draws from the global torch RNG; ours with the same seed agrees."""
    reference = open_clip_image_transform(224, is_train=True)
    ours = image_transform(PreprocessConfig(), train=True)
    assert isinstance(ours, TrainTransform)
    for seed, name in enumerate(["coffee", "camera", "logo_rgba", "coffee_palette", "rocket_cmyk", "text"]):
        torch.manual_seed(seed)
        expected = reference(photos[name])
        _assert_same(expected, ours(photos[name], torch.Generator().manual_seed(seed)), name)
        torch.manual_seed(seed)
        _assert_same(expected, ours(photos[name]), f"{name} (global RNG)")


def test_train_equals_hand_computed_random_resized_crop(photos):
    """The crop box from torchvision's get_params, applied by hand with torchvision's functional ops."""
    cfg = PreprocessConfig(size=96, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD)
    ours = TrainTransform(cfg, scale=(0.3, 0.6), ratio=(0.5, 2.0))
    for seed in range(6):
        image = photos["chelsea"]
        torch.manual_seed(1000 + seed)
        top, left, height, width = RandomResizedCrop.get_params(image, [0.3, 0.6], [0.5, 2.0])
        assert 0.25 <= height * width / (image.width * image.height) <= 0.65
        cropped = TF.resized_crop(image, top, left, height, width, [96, 96], InterpolationMode.BICUBIC)
        expected = TF.normalize(TF.to_tensor(cropped.convert("RGB")), cfg.mean, cfg.std)
        _assert_same(expected, ours(image, torch.Generator().manual_seed(1000 + seed)), f"seed {seed}")


@pytest.mark.parametrize(("width", "height"), [(451, 300), (300, 451), (64, 64), (1000, 9), (9, 1000), (3, 2)])
def test_sample_crop_follows_torchvision_get_params(width, height):
    """Same draws as torchvision, including the central-crop fallback for extreme aspect ratios."""
    for scale, ratio in (((0.9, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.5), (0.25, 4.0))):
        ours = TrainTransform(PreprocessConfig(size=32), scale=scale, ratio=ratio)
        for seed in range(40):
            torch.manual_seed(seed)
            expected = RandomResizedCrop.get_params(Image.new("L", (width, height)), list(scale), list(ratio))
            assert ours.sample_crop(width, height, torch.Generator().manual_seed(seed)) == tuple(expected)


def test_sample_crop_statistics_for_open_clip_defaults():
    """scale=(0.9, 1.0), ratio=(3/4, 4/3): crops cover 90-100% of the area, positions vary, all in bounds."""
    ours = TrainTransform(PreprocessConfig())
    generator = torch.Generator().manual_seed(7)
    width, height = 640, 480
    boxes = [ours.sample_crop(width, height, generator) for _ in range(500)]
    areas = np.array([h * w / (width * height) for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert all(0 <= top and top + h <= height and 0 <= left and left + w <= width for top, left, h, w in boxes)
    assert areas.min() >= 0.895 and areas.max() <= 1.0
    assert 0.92 < areas.mean() < 0.97  # uniform in [0.9, 1.0] minus rejected (out-of-bounds) draws
    assert ratios.min() >= 0.75 - 0.01 and ratios.max() <= 4 / 3 + 0.01
    assert len({(top, left) for top, left, _, _ in boxes}) > 100


def test_train_generator_controls_randomness(photos):
    ours = TrainTransform(PreprocessConfig(size=64))
    image = photos["astronaut"]
    global_state = torch.get_rng_state()
    first = ours(image, torch.Generator().manual_seed(3))
    again = ours(image, torch.Generator().manual_seed(3))
    other = ours(image, torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (3, 64, 64) and first.dtype == torch.float32


def test_color_jitter_and_grayscale_follow_the_documented_draws(photos):
    """Reference: torchvision's ColorJitter.get_params and PIL ops, drawing in the documented order."""
    jitter = (0.4, 0.4, 0.4, 0.1)
    cfg = PreprocessConfig(size=64)
    ours = TrainTransform(cfg, color_jitter=jitter, color_jitter_prob=1.0, gray_scale_prob=1.0)
    reference_jitter = TorchvisionColorJitter(*jitter)
    image = photos["coffee"]
    for seed in range(4):
        torch.manual_seed(seed)
        top, left, height, width = RandomResizedCrop.get_params(image, [0.9, 1.0], [3 / 4, 4 / 3])
        expected = TF.resized_crop(image, top, left, height, width, [64, 64], InterpolationMode.BICUBIC).convert("RGB")
        assert torch.rand(1).item() < 1.0  # jitter coin flip
        order, *factors = reference_jitter.get_params(
            reference_jitter.brightness, reference_jitter.contrast, reference_jitter.saturation, reference_jitter.hue
        )
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for index in order.tolist():
            expected = adjust[index](expected, factors[index])
        assert torch.rand(1).item() < 1.0  # grayscale coin flip
        expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        expected_tensor = TF.normalize(TF.to_tensor(expected), cfg.mean, cfg.std)
        _assert_same(expected_tensor, ours(image, torch.Generator().manual_seed(seed)), f"seed {seed}")


def test_grayscale_probability_is_respected():
    """With equal per-channel mean/std a grayscale output has three equal channels; count them."""
    cfg = PreprocessConfig(size=16, mean=transforms.INCEPTION_MEAN, std=transforms.INCEPTION_STD)
    ours = TrainTransform(cfg, gray_scale_prob=0.3)
    image = Image.fromarray(data.astronaut()).resize((32, 32))
    generator = torch.Generator().manual_seed(11)
    outputs = [ours(image, generator) for _ in range(300)]
    gray = sum(bool(torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])) for x in outputs)
    assert 0.2 < gray / 300 < 0.4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scale": (1.0, 0.5)}, "augmentation.scale"),
        ({"ratio": (0.0, 1.0)}, "augmentation.ratio"),
        ({"gray_scale_prob": 1.5}, "augmentation.gray_scale_prob"),
        ({"color_jitter_prob": 0.8}, "augmentation.color_jitter"),
        ({"color_jitter": (0.4, 0.4, 0.4)}, "augmentation.color_jitter"),
        ({"color_jitter": (0.4, 0.4, 0.4, 0.7)}, "augmentation.color_jitter"),
        ({"color_jitter": (-0.1, 0.4, 0.4, 0.1)}, "augmentation.color_jitter"),
    ],
)
def test_train_rejects_bad_augmentation_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        TrainTransform(PreprocessConfig(), **kwargs)
