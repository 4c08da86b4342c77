"""`emergence-ray models`: what `model.name` accepts, the weights `model.pretrained` can name, and
(`--blocks NAME`) the blocks `model.freeze: N` counts."""

from __future__ import annotations

from emergence_ray.config import SMALL_MODELS, TORCHVISION_MODELS

SMALL_NOTES = {"cnn": "small conv net for tiny images (the default)", "mlp": "sigmoid multilayer perceptron",
               "resnet18_small": "ResNet-18 with a 3x3 stride-1 stem and no max-pool, for tiny images"}


def rows() -> list[tuple[str, str, str, str]]:
    """(name, family, weights, parameters in millions) for every model."""
    import torchvision.models as tvm

    from emergence_ray.models.zoo import MIN_SIZE, family

    out = [(name, "small", "-", SMALL_NOTES[name]) for name in SMALL_MODELS]
    for name in TORCHVISION_MODELS:
        weights = tvm.get_model_weights(name)
        members = [w for w in weights.__members__ if w != "DEFAULT"]
        params = weights[members[0]].meta.get("num_params") if members else None
        fam = family(name)
        note = f"{params / 1e6:.1f} M parameters" if params else ""
        if fam in MIN_SIZE:
            note += f", images >= {MIN_SIZE[fam]} px"
        out.append((name, fam, ", ".join(["DEFAULT", *members]) if members else "-", note))
    return out


def print_models() -> None:
    table = rows()
    width = max(len(r[0]) for r in table)
    fam_w = max(len(r[1]) for r in table)
    print(f"{'model.name':<{width}}  {'family':<{fam_w}}  model.pretrained weights (or a state_dict / run checkpoint)")
    for name, fam, weights, note in table:
        print(f"{name:<{width}}  {fam:<{fam_w}}  {weights}" + (f"  ({note})" if note else ""))
    print(f"{len(table)} models. Any of them also takes model.pretrained=PATH (a state_dict file, s3:// or gs://) "
          "or a checkpoint directory of an earlier run.")


def print_blocks(name: str) -> None:
    from emergence_ray.config import validate
    from emergence_ray.models import build_model
    from emergence_ray.models.zoo import blocks, input_size_problem

    validate({"model": {"name": name}})  # an unknown name: ConfigError with the closest names
    size = next(s for s in (64, 75, 224) if name in SMALL_MODELS or input_size_problem(name, s) is None)
    model = build_model(name, 3, 10, size)
    for i, (label, _) in enumerate(blocks(model, model.er_head), start=1):
        print(f"{i:>3}  {label}")
    print(f"head: {model.er_head} (model.freeze=backbone trains only this)")
