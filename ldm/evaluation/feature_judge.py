"""A judge for images of any captioned folder: linear classifiers on pretrained features.

    judge = FeatureJudge.train(images, {"category": [...], "name": [...]})
    judge.topk(images, "name", 5)        # (N, 5) label indices, best first
    judge.save("runs/emoji_judge"); FeatureJudge.load("runs/emoji_judge")

Features: the pooled 1280-channel head of EfficientNet-Lite0 with its ImageNet weights (the
pip package the perceptual loss uses, so nothing is downloaded), on images resized to
`FEATURE_SIZE`, L2-normalised. On top, one softmax regression per label field (an emoji's
`category` and `name`, from its metadata row), trained full-batch with AdamW. The backbone is
frozen: the judge learns only what separates the labels in features it did not learn from
these images, so it can be checked honestly on images it never saw (ldm/evaluate.py trains it
on one emoji style and tests on the other, on blurred copies and on random images).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

FEATURE_SIZE = 128  # pixels per side fed to the backbone (emoji are 64: upsampled)
BATCH = 64


class FeatureJudge:
    def __init__(self, labels: dict[str, list[str]], heads: dict[str, torch.nn.Linear]):
        self.labels, self.heads = labels, heads
        self._backbone = None

    # --- features ----------------------------------------------------------------------
    def backbone(self):
        if self._backbone is None:
            from ldm.modules.losses.efficientnet import load_efficientnet_lite0

            self._backbone = load_efficientnet_lite0(include_top=True)
        return self._backbone

    @torch.no_grad()
    def features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> (N, 1280) unit-norm features."""
        return image_features(self.backbone(), images)

    # --- training and use ------------------------------------------------------------
    @classmethod
    def train(cls, images: np.ndarray | None, labels: dict[str, list[str]], steps: int = 300,
              weight_decay: float = 1e-4, features: torch.Tensor | None = None) -> FeatureJudge:
        """Fit one head per label field (`labels[field][i]` is image i's label)."""
        judge = cls({}, {})
        feats = judge.features(images) if features is None else features
        for field, values in labels.items():
            names = sorted(set(values))
            index = {n: i for i, n in enumerate(names)}
            target = torch.tensor([index[v] for v in values])
            judge.labels[field] = names
            judge.heads[field] = fit_head(feats, target, len(names), steps, weight_decay)
        return judge

    @torch.no_grad()
    def logits(self, images: np.ndarray | None, field: str,
               features: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.features(images) if features is None else features
        return self.heads[field](feats)

    def topk(self, images: np.ndarray | None, field: str, k: int,
             features: torch.Tensor | None = None) -> np.ndarray:
        """(N, k) label indices of `field`, most likely first."""
        k = min(k, len(self.labels[field]))
        return self.logits(images, field, features).topk(k, dim=1).indices.numpy()

    def accuracy(self, images: np.ndarray | None, field: str, truth: list[str], k: int = 1,
                 features: torch.Tensor | None = None) -> float:
        """Fraction of images whose true label is among the top `k` (unknown labels miss)."""
        top = self.topk(images, field, k, features)
        names = self.labels[field]
        return float(np.mean([t in {names[j] for j in row} for t, row in zip(truth, top,
                                                                              strict=True)]))

    # --- files -------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {f"{f}.{k}": v.contiguous() for f, h in self.heads.items()
                 for k, v in h.state_dict().items()}
        save_file(state, str(folder / "heads.safetensors"))
        (folder / "labels.json").write_text(json.dumps(self.labels, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> FeatureJudge:
        folder = Path(folder)
        if not (folder / "labels.json").is_file():
            raise FileNotFoundError(f"{folder}: no judge here (labels.json); train one with "
                                    "python -m ldm.evaluate judge")
        labels = json.loads((folder / "labels.json").read_text())
        state = load_file(str(folder / "heads.safetensors"))
        heads = {}
        for field, names in labels.items():
            weight = state[f"{field}.weight"]
            head = torch.nn.Linear(weight.shape[1], len(names))
            head.load_state_dict({"weight": weight, "bias": state[f"{field}.bias"]})
            heads[field] = head.eval()
        return cls(labels, heads)


@torch.no_grad()
def image_features(backbone, images: np.ndarray) -> torch.Tensor:
    """Pooled head features of uint8 (N, H, W, 3) images, unit-normalised."""
    from ldm.modules.losses.efficientnet import LITE_MEAN, LITE_STD

    mean = torch.tensor(LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), BATCH):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + BATCH]))
        x = x.permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
        h = backbone.features((x - mean) / std)[-1]
        h = F.relu6(backbone._bn1(backbone._conv_head(h))).mean(dim=(2, 3))
        out.append(F.normalize(h, dim=1))
    return torch.cat(out) if out else torch.zeros(0, 1280)


def fit_head(feats: torch.Tensor, target: torch.Tensor, classes: int, steps: int,
             weight_decay: float) -> torch.nn.Linear:
    """Softmax regression on fixed features, full batch (features are unit-norm: a large
    temperature is learned through the weights)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(feats.shape[1], classes)
    opt = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(feats), target).backward()
        opt.step()
    return head.eval()
