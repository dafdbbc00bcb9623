"""Encoding speed: clipforge vs open_clip on identical ViT-B-32 random weights, in one process.

open_clip runs as a user runs it (fp32, ``torch.no_grad``, its tokenizer pads every caption to 77);
clipforge runs fp32 and bf16 (weights cast once), encoding text only up to the batch's last end token.
Also reports how close clipforge-bf16 features are to open_clip fp32 (mean cosine).

    python benchmarks/encode.py [--quick]
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from _common import interleaved_medians, parser, report

import clipforge

WORDS = (
    "a the photo of small large red blue green yellow dog cat bird car tree house street person people "
    "sitting standing running on in near with under next to two three old young white black wooden field"
).split()


def captions(count: int, seed: int = 0) -> list[str]:
    """Captions of 5–15 words, like alt-text."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(count)]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    import open_clip

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32").eval()
    ref_tokenizer = open_clip.get_tokenizer("ViT-B-32")
    state = reference.state_dict()
    ours = clipforge.load("ViT-B-32")
    ours.load_state_dict(state)
    ours_bf16 = clipforge.load("ViT-B-32")
    ours_bf16.load_state_dict(state)
    ours_bf16 = ours_bf16.to(torch.bfloat16)

    image_batch, text_batch = 32, 256
    repeats = 3 if args.quick else 10
    pixels = torch.randn(image_batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    texts = captions(text_batch)

    def openclip_image() -> torch.Tensor:
        with torch.no_grad():
            return reference.encode_image(pixels)

    def openclip_text() -> torch.Tensor:
        with torch.no_grad():
            return reference.encode_text(ref_tokenizer(texts))

    def clipforge_image(model: clipforge.CLIP) -> torch.Tensor:
        with torch.inference_mode():
            return model.encode_image(pixels)

    def clipforge_text(model: clipforge.CLIP) -> torch.Tensor:
        with torch.inference_mode():
            return model.encode_text(model.tokenize(texts))

    image_s = interleaved_medians(
        {
            "open_clip fp32": openclip_image,
            "clipforge fp32": lambda: clipforge_image(ours),
            "clipforge bf16": lambda: clipforge_image(ours_bf16),
        },
        repeats,
    )
    text_s = interleaved_medians(
        {
            "open_clip fp32": openclip_text,
            "clipforge fp32": lambda: clipforge_text(ours),
            "clipforge bf16": lambda: clipforge_text(ours_bf16),
        },
        repeats,
    )
    cosine_image = F.cosine_similarity(clipforge_image(ours_bf16).float(), openclip_image()).mean().item()
    cosine_text = F.cosine_similarity(clipforge_text(ours_bf16).float(), openclip_text()).mean().item()

    rows, figures = [], {"benchmark": "encode", "model": "ViT-B-32", "threads": torch.get_num_threads()}
    base_image, base_text = image_s["open_clip fp32"], text_s["open_clip fp32"]
    for name in image_s:
        rows.append([name, image_batch / image_s[name], base_image / image_s[name], text_batch / text_s[name], base_text / text_s[name]])
    figures.update(
        image_per_s_openclip=round(image_batch / base_image, 2),
        image_per_s_fp32=round(image_batch / image_s["clipforge fp32"], 2),
        image_per_s_bf16=round(image_batch / image_s["clipforge bf16"], 2),
        text_per_s_openclip=round(text_batch / base_text, 1),
        text_per_s_bf16=round(text_batch / text_s["clipforge bf16"], 1),
        image_bf16_vs_openclip=round(base_image / image_s["clipforge bf16"], 3),
        image_fp32_vs_openclip=round(base_image / image_s["clipforge fp32"], 3),
        text_bf16_vs_openclip=round(base_text / text_s["clipforge bf16"], 3),
        text_fp32_vs_openclip=round(base_text / text_s["clipforge fp32"], 3),
        cosine_bf16=round(cosine_image, 6),
        cosine_bf16_text=round(cosine_text, 6),
    )
    report(
        f"ViT-B-32 encoding ({image_batch} images at 224 px, {text_batch} captions of 5–15 words; medians of {repeats})",
        ["variant", "images/s", "vs open_clip", "texts/s", "vs open_clip"],
        rows,
        figures,
    )


if __name__ == "__main__":
    main()
