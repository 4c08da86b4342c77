"""torchvision's classification models as ours: built for the data's classes (the head) and
channels (the stem), with the input-size limits of each family and its blocks for freezing.

    model = build_torchvision("resnet50", in_channels=1, num_classes=10, image_size=64)
"""

from __future__ import annotations

import re

from torch import nn

# Families, longest prefix first; tests/test_models.py checks that every torchvision name has one.
FAMILIES = ("alexnet", "convnext", "densenet", "efficientnet_v2", "efficientnet", "googlenet", "inception",
            "maxvit", "mnasnet", "mobilenet_v2", "mobilenet_v3", "regnet_x", "regnet_y", "resnext", "resnet",
            "shufflenet", "squeezenet", "swin_v2", "swin", "vgg", "vit", "wide_resnet")
# The smallest model of each family: what the family tests build.
SMALLEST = {"alexnet": "alexnet", "convnext": "convnext_tiny", "densenet": "densenet121",
            "efficientnet_v2": "efficientnet_v2_s", "efficientnet": "efficientnet_b0", "googlenet": "googlenet",
            "inception": "inception_v3", "maxvit": "maxvit_t", "mnasnet": "mnasnet0_5",
            "mobilenet_v2": "mobilenet_v2", "mobilenet_v3": "mobilenet_v3_small", "regnet_x": "regnet_x_400mf",
            "regnet_y": "regnet_y_400mf", "resnext": "resnext50_32x4d", "resnet": "resnet18",
            "shufflenet": "shufflenet_v2_x0_5", "squeezenet": "squeezenet1_1", "swin_v2": "swin_v2_t",
            "swin": "swin_t", "vgg": "vgg11", "vit": "vit_b_32", "wide_resnet": "wide_resnet50_2"}
# Smallest square input each family's downsampling survives (found by building them); the others take 16 px.
MIN_SIZE = {"alexnet": 63, "convnext": 32, "densenet": 32, "inception": 75, "maxvit": 224, "squeezenet": 32,
            "vgg": 32}


def family(name: str) -> str:
    for f in FAMILIES:
        if name.startswith(f):
            return f
    raise KeyError(name)


def input_size_problem(name: str, size: int) -> str | None:
    """Why `name` cannot take `size` x `size` images (None when it can), with the fix."""
    fam = family(name)
    lowest = MIN_SIZE.get(fam, 16)
    if size < lowest:
        return f"model {name} needs images of at least {lowest} px, the data gives {size}; set data.image_size"
    if fam == "maxvit" and size % 224:
        return f"model {name} needs an image size that is a multiple of 224, not {size}; set data.image_size=224"
    if fam == "vit":
        patch = int(re.search(r"_(\d+)$", name).group(1))
        if size % patch:
            return (f"model {name} needs an image size divisible by its patch size {patch}, not {size}; "
                    f"set data.image_size={max(patch, size // patch * patch)}")
    return None


def build_torchvision(name: str, in_channels: int, num_classes: int, image_size: int,
                      imagenet_weights: bool = False) -> nn.Module:
    """The architecture only, head sized for `num_classes`; weights are loaded by `pretrained`.
    `imagenet_weights`: set what torchvision's own builder sets when it loads its weights
    (GoogLeNet and Inception-v3 re-normalize their input as their original training did)."""
    import torchvision.models as tvm

    fam = family(name)
    kwargs: dict = {"num_classes": num_classes}
    if fam == "vit":
        kwargs["image_size"] = image_size
    if fam == "maxvit":
        kwargs["input_size"] = (image_size, image_size)
    if fam in ("googlenet", "inception"):
        # no auxiliary heads: the loop trains one output (their weights are dropped on loading)
        kwargs.update(aux_logits=False, init_weights=True, transform_input=imagenet_weights and in_channels == 3)
    model = tvm.get_model(name, weights=None, **kwargs)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    return model


def first_conv(model: nn.Module) -> str:
    """Name of the stem convolution: the first Conv2d in module order (true of every torchvision model)."""
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    name = first_conv(model)
    old = model.get_submodule(name)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None, old.padding_mode)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def head_name(model: nn.Module, num_classes: int) -> str:
    """The classifier head: the last Linear (or 1x1 Conv2d, SqueezeNet) producing `num_classes`."""
    found = None
    for n, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or \
                (isinstance(m, nn.Conv2d) and m.out_channels == num_classes):
            found = n
    if found is None:
        raise ValueError(f"no classifier head with {num_classes} outputs in {type(model).__name__}")
    return found


def _stack_of_blocks(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 1 and any(len(list(c.children())) for c in m)


def _expandable(name: str, m: nn.Module) -> str | None:
    """`name` if `m` is a stack of blocks, or the name of the long stack inside it (ViT's encoder)."""
    if _stack_of_blocks(m):
        return name
    for n, child in m.named_children():
        if _stack_of_blocks(child) and len(child) >= 4:
            return f"{name}.{n}"
    return None


def blocks(model: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    """The model's stages in forward order, for `model.freeze: N`: (label, module names).

    The model's top-level modules are its stages (ResNet: stem, layer1..layer4), except where one
    stack holds the whole trunk (`features` of EfficientNet, MobileNet, ConvNeXt, Swin; ViT's
    encoder layers): then its items are. Modules without submodules (a conv, a norm, a pool) merge
    with their neighbours, up to a pooling layer, so the stem is the first stage. Stages without
    parameters are left out; the head's container is never a stage."""
    out: list[tuple[str, list[str]]] = []
    group: list[str] = []

    def close() -> None:
        if group:
            out.append((group[0] if len(group) == 1 else f"{group[0]} .. {group[-1]}", list(group)))
            group.clear()

    def visit(full: str, m: nn.Module, expand: str | None) -> None:
        if full == head or head.startswith(full + "."):
            return
        if expand is not None and (full == expand or expand.startswith(full + ".")):
            close()
            for n, child in m.named_children():
                visit(f"{full}.{n}", child, expand if full != expand else None)
            return
        if len(list(m.children())):
            close()
            out.append((full, [full]))
        else:
            group.append(full)
            if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                close()

    children = list(model.named_children())
    trunk = [(n, c) for n, c in children if not (n == head or head.startswith(n + "."))]
    expandable = [e for n, c in trunk for e in [_expandable(n, c)] if e]
    if not expandable:  # VGG, AlexNet: one plain stack of convs and pools
        expandable = [n for n, c in trunk if isinstance(c, nn.Sequential)
                      and any(isinstance(x, (nn.MaxPool2d, nn.AvgPool2d)) for x in c)]
    expand = expandable[0] if len(expandable) == 1 else None
    for n, c in children:
        visit(n, c, expand)
    close()
    owners = {n.rsplit(".", 1)[0] if "." in n else "" for n, _ in model.named_parameters()}
    return [(label, names) for label, names in out
            if any(p == m or p.startswith(m + ".") for m in names for p in owners)]
