"""Registry of CNN architectures: how each is built, where its ImageNet weights come from, where its head is cut.

A torchvision CNN registers with one `register_torchvision` line; any timm model name works when timm is
installed. `build_body` returns the feature extractor with the requested weights — ImageNet (downloaded
once into torch's cache), a local file, or none — and is called before any data is loaded, so a weights
problem costs the user no waiting.
"""
from __future__ import annotations

import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from fastclass.errors import FastclassError
from fastclass.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
PRETRAINED = "pretrained"
NO_WEIGHTS = "none"


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: `cut` drops the classifier (children from `cut` on); `split` gives fastai the
    parameter groups that discriminative learning rates spread over."""

    name: str
    family: str
    cut: int | None = None
    split: Callable | None = None
    stats: tuple[list[float], list[float]] = (IMAGENET_STATS[0], IMAGENET_STATS[1])


ARCHS: Registry[ArchSpec] = Registry("architecture")


def register_arch(spec: ArchSpec) -> ArchSpec:
    return ARCHS.register(spec.name, spec)


def _fastai_split(name: str) -> Callable:
    from fastai.vision import learner

    return getattr(learner, name)


def register_torchvision(names: str, cut: int, split: str | None = None) -> None:
    for name in names.split():
        register_arch(ArchSpec(name, "torchvision", cut, _fastai_split(split) if split else None))


register_torchvision("resnet18 resnet34 resnet50 resnet101 resnet152 resnext50_32x4d resnext101_32x8d "
                     "wide_resnet50_2 wide_resnet101_2", cut=-2, split="_resnet_split")
register_torchvision("densenet121 densenet161 densenet169 densenet201", cut=-1, split="_densenet_split")
register_torchvision("vgg11_bn vgg13_bn vgg16_bn vgg19_bn", cut=-2, split="_vgg_split")
register_torchvision("squeezenet1_0 squeezenet1_1", cut=-1, split="_squeezenet_split")
register_torchvision("efficientnet_b0 efficientnet_b1 efficientnet_b2 efficientnet_b3 efficientnet_v2_s "
                     "mobilenet_v2 mobilenet_v3_small mobilenet_v3_large convnext_tiny convnext_small "
                     "convnext_base regnet_y_400mf regnet_y_800mf regnet_y_1_6gf regnet_y_3_2gf", cut=-2)


def get_arch(name: str) -> ArchSpec:
    """A registered architecture, or any timm model name when timm is installed."""
    if name in ARCHS:
        return ARCHS[name]
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        cfg = timm.get_pretrained_cfg(name)
        stats = (list(cfg.mean), list(cfg.std)) if cfg is not None else IMAGENET_STATS
        return ArchSpec(name, "timm", None, None, stats)
    return ARCHS.lookup(name, "" if timm is not None else " (or a timm model name once `pip install timm` is done)")


@dataclass
class Body:
    """A feature extractor and what was loaded into it."""

    module: nn.Module
    features: int
    needs_pool: bool
    weights: str


def build_body(spec: ArchSpec, weights: str) -> Body:
    """The architecture without its classifier, with ImageNet weights (`pretrained`), a file's, or none."""
    from fastai.callback.hook import num_features_model
    from fastai.vision.learner import TimmBody, create_body

    if spec.family == "timm":
        import timm

        try:
            model = timm.create_model(spec.name, pretrained=weights == PRETRAINED, num_classes=0)
        except Exception as exc:  # timm's hub download raises many kinds; all mean the same to the user
            raise _offline_error(spec.name, f"timm/{spec.name}", exc) from exc
        described = _load_weights(spec, model, weights, kept=None)
        body = TimmBody(model, weights != NO_WEIGHTS)
        return Body(body, model.num_features, body.needs_pool, described)
    import torchvision

    model = torchvision.models.get_model(spec.name, weights=None)
    kept = [name for name, _ in list(model.named_children())[:spec.cut]]
    described = _load_weights(spec, model, weights, kept)
    body = create_body(model, 3, weights != NO_WEIGHTS, spec.cut)
    return Body(body, num_features_model(body), True, described)


def _load_weights(spec: ArchSpec, model: nn.Module, weights: str, kept: list[str] | None) -> str:
    if weights == NO_WEIGHTS:
        return "random initialisation"
    if weights == PRETRAINED:
        if spec.family == "timm":
            return f"ImageNet weights of timm/{spec.name}"
        url = _torchvision_url(spec.name)
        model.load_state_dict(_download_state_dict(spec.name, url))
        return f"ImageNet weights from {url}"
    path = Path(weights).expanduser()
    state = read_state_dict(path)
    targets = [k for k in model.state_dict() if kept is None or k.split(".", 1)[0] in kept]
    mapped = match_state_dict(state, model.state_dict(), targets)
    if mapped is None:
        by_name = sum(1 for k in targets if k in state)
        raise FastclassError(f"weights file {path} does not fit {spec.name}: {by_name} of the {len(targets)} tensors of "
                             "its body match by name and they do not line up by shape in order; "
                             f"is it a checkpoint of {spec.name}?")
    missing, _ = model.load_state_dict(mapped, strict=False)
    unloaded = [k for k in targets if k in missing]
    assert not unloaded, f"body tensors left unloaded: {unloaded[:3]}"
    return f"{len(targets)} tensors from {path}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict or checkpoint file (a dict under 'state_dict' or 'model' is unwrapped)."""
    if not path.is_file():
        raise FastclassError(f"weights file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for files that are not checkpoints
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FastclassError(f"cannot read weights file {path}: {first[:200]}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if isinstance(data, nn.Module):
        data = data.state_dict()
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(data, dict) else {}
    if not tensors:
        raise FastclassError(f"weights file {path} holds no state_dict (a mapping of names to tensors)")
    prefix = os.path.commonprefix(list(tensors)) if len(tensors) > 1 else ""
    for strip in ("module.", "model."):
        if prefix.startswith(strip):
            tensors = {k[len(strip):]: v for k, v in tensors.items()}
    return tensors


def match_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                     keys: list[str]) -> dict[str, torch.Tensor] | None:
    """Map a checkpoint onto the target's `keys`: by name when every key is there with its shape and the
    checkpoint has no tensor the target lacks (a deeper relative, resnet34 for resnet18, has), else by
    position when the checkpoint's tensors line up in order and shape (the same network saved by another
    implementation, e.g. EfficientNet-Lite0 from its reference code into timm). None when neither fits."""
    if (all(k in source and source[k].shape == target[k].shape for k in keys)
            and all(k in target for k in source)):
        return {k: source[k] for k in keys}
    values = list(source.values())
    if len(values) >= len(keys) and all(v.shape == target[k].shape for v, k in zip(values, keys)):
        return dict(zip(keys, values))
    return None


def _torchvision_url(name: str) -> str:
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT.url


def _download_state_dict(name: str, url: str) -> dict[str, torch.Tensor]:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not cached.exists():
        log.info("downloading the ImageNet weights of %s from %s", name, url)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise _offline_error(name, url, exc) from exc


def _offline_error(name: str, source: str, exc: BaseException) -> FastclassError:
    reason = getattr(exc, "reason", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return FastclassError(f"cannot get the ImageNet weights of {name} from {source} ({str(reason)[:120]}); "
                          "on a machine without network use --weights FILE (a saved state_dict) or --no-pretrained")
