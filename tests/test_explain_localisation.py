"""Does a Score-CAM map follow the text? The test that chose ``DEFAULT_WEIGHTING`` (slow; the trained demo model).

The rule was fixed before any result was seen:
- images: the first 200 scenes of the synthetic world's test split with a second object to the left or right of
  the first whose caption differs from the first's ("a photo of a {color} {shape}.");
- per image and weighting, the map for each object's caption; m(R | map) is the share of the map's mass inside
  region R (the object's box, pixels near its colour); the image counts as a success when
  [m(A | map_A) − m(A | map_B)] + [m(B | map_B) − m(B | map_A)] > 0;
- a weighting passes when its successes are significantly more than half (one-sided sign test, p < 0.01); the
  default is the passing weighting with the most successes (ties: increase, logit, cosine). That rule chose
  ``logit`` on the demo model of 2026-12-03 (187 of 200 against increase's 183); on a demo model trained on
  another machine logit and increase tied at 181, so the test now keeps what the choice established: the
  default passes, and no weighting follows the caption significantly more often on the same images (exact
  McNemar test, p < 0.05);
- model randomisation (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): the same maps from the
  demo architecture with fresh random weights must differ from the trained model's (mean Spearman rank
  correlation below 0.5; a constant map counts as 0) and must not pass the sign test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, spearmanr

import clipforge
from clipforge.data.synthetic import SyntheticWorld
from clipforge.data.synthetic.concepts import COLORS
from clipforge.encode import encode_texts
from clipforge.explain.scorecam import (
    DEFAULT_WEIGHTING,
    WEIGHTINGS,
    channel_scores,
    maps_from,
)

IMAGES = 200


def region(image, box: list[int], color: str) -> np.ndarray:
    """Pixels inside ``box`` close to ``color`` (the object as rendered)."""
    pixels = np.asarray(image, dtype=np.int32)
    near = np.abs(pixels - np.array(COLORS[color])).sum(axis=2) < 60
    inside = np.zeros(near.shape, dtype=bool)
    x0, y0, x1, y1 = box
    inside[y0:y1, x0:x1] = True
    return near & inside


def two_object_scenes(world: SyntheticWorld, count: int) -> list:
    scenes, index = [], 0
    while len(scenes) < count:
        sample = world.sample("test", index)
        meta = sample.metadata
        index += 1
        if meta["second_shape"] is None or meta["relation"] not in ("left of", "right of"):
            continue
        if (meta["shape"], meta["color"]) == (meta["second_shape"], meta["second_color"]):
            continue
        scenes.append(sample)
    return scenes


def localisation(model: clipforge.CLIP, scenes: list) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """Per weighting: the success of each image, and every map (for the randomisation check)."""
    found: dict[str, tuple[list[bool], list[np.ndarray]]] = {name: ([], []) for name in WEIGHTINGS}
    for sample in scenes:
        meta = sample.metadata
        captions = [f"a photo of a {meta['color']} {meta['shape']}.", f"a photo of a {meta['second_color']} {meta['second_shape']}."]
        pixels = model.preprocess(sample.image)[None]
        scores = channel_scores(model, pixels, encode_texts(model, captions))
        view = sample.image.resize(scores.size[::-1])
        regions = [region(view, meta["boxes"][0], meta["color"]), region(view, meta["second_box"], meta["second_color"])]
        assert all(mask.any() for mask in regions)
        for name in WEIGHTINGS:
            maps = [maps_from(scores, text, name)[0].numpy() for text in (0, 1)]
            mass = [[float(m[r].sum() / max(m.sum(), 1e-12)) for r in regions] for m in maps]  # mass[map][region]
            gain = (mass[0][0] - mass[1][0]) + (mass[1][1] - mass[0][1])
            found[name][0].append(gain > 0)
            found[name][1].extend(maps)
    return {name: (np.array(wins), maps) for name, (wins, maps) in found.items()}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps; a constant map (relu left nothing) has no rank order to keep: 0."""
    if a.min() == a.max() or b.min() == b.max():
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


@pytest.mark.slow
def test_the_default_weighting_is_the_one_that_localises(demo_model) -> None:
    world = SyntheticWorld()
    scenes = two_object_scenes(world, IMAGES)
    trained = localisation(demo_model, scenes)
    p_values = {name: binomtest(int(wins.sum()), len(wins), 0.5, alternative="greater").pvalue for name, (wins, _) in trained.items()}
    for name, (wins, _) in trained.items():
        print(f"{name}: {wins.sum()}/{len(wins)} images follow the caption, sign-test p = {p_values[name]:.2e}")
    assert p_values[DEFAULT_WEIGHTING] < 0.01, "the default weighting does not localise the caption's object"
    default_wins = trained[DEFAULT_WEIGHTING][0]
    for name, (wins, _) in trained.items():
        better, worse = int((wins & ~default_wins).sum()), int((default_wins & ~wins).sum())
        if better + worse:
            assert binomtest(better, better + worse, 0.5, alternative="greater").pvalue >= 0.05, f"{name} localises better"

    torch.manual_seed(1)
    randomised = clipforge.CLIP(demo_model.config, demo_model.preprocess_cfg).eval()
    shuffled = localisation(randomised, scenes)
    wins, maps = shuffled[DEFAULT_WEIGHTING]
    correlation = np.mean([rank_correlation(a, b) for a, b in zip(trained[DEFAULT_WEIGHTING][1], maps)])
    p_random = binomtest(int(wins.sum()), len(wins), 0.5, alternative="greater").pvalue
    print(f"randomised model: {wins.sum()}/{len(wins)}, p = {p_random:.2e}, mean rank correlation to the trained maps {correlation:.3f}")
    assert correlation < 0.5 and p_random >= 0.01
