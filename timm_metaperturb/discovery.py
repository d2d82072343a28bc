"""Where MetaPerturb goes: a network's blocks, and the point inside each block that φ perturbs.

Blocks are found by the first of these rules that finds any (or taken from the user's `blocks=`):

1. `group_matcher`: a timm model's `group_matcher(coarse=False)["blocks"]` patterns that stand for repeated
   blocks (ordinal None), keeping the matched modules that hold a Conv2d and have children; where the matcher
   is a function of module names (inception_v3), the deepest module holding each of its groups.
2. `block_classes`: in a network whose blocks no group_matcher names (torchvision's, timm's HRNet), the
   library's own block classes for that network (`BLOCK_CLASSES`), named the way PEFT names its target
   modules per architecture.
3. `containers`: modules with children that hold a Conv2d and sit in an nn.Sequential / ModuleList /
   ModuleDict (the way torchvision and hand-written networks stack blocks), innermost ones only.
4. `conv_runs`: in a flat nn.Sequential (VGG, hand-written stacks) or directly in the model, each Conv2d with
   the norm and activation layers that follow it is one block.

A probe forward (batch of 2, eval mode, no grad, its own random generator) then records, for every block,
the leaf modules it runs in order and their shapes. With `placement="pre_activation"` (the default, the
authors' choice: after the residual addition, before the block's final ReLU) φ perturbs the input of the
block's closing activation, that is the last activation run in the block when only parameter-free layers
(pooling, dropout, identity) follow it, and the block's output when there is none. `placement="output"`
always perturbs the block's output.

Blocks found by the rules that the probe's forward does not run (unused heads, training-only branches) are left
out, and so, with a warning, are those with no (B, C, H, W) feature map to perturb (a hybrid network's
transformer stage); blocks given by the user must all qualify. A map whose channels lie in its last dimension,
(B, H, W, C) (MambaOut), is recognised by the features of the last layer that made it and perturbed as the
(B, C, H, W) map it is.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
PLACEMENTS = ("pre_activation", "output")
ACTIVATION_MODULES = (
    "torch.nn.modules.activation",
    "timm.layers.activations",
    "timm.layers.activations_me",
)
NOT_ACTIVATIONS = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)

BlocksSpec = str | Sequence[str] | type | tuple[type, ...] | None

# library -> its network classes -> the classes of their blocks (stems, transitions, SE and fuse layers are not
# blocks): networks whose blocks no group_matcher names
BLOCK_CLASSES = {
    "torchvision.models": {
        "ResNet": ("BasicBlock", "Bottleneck"),
        "MobileNetV2": ("InvertedResidual",),
        "MobileNetV3": ("InvertedResidual",),
        "EfficientNet": ("MBConv", "FusedMBConv"),
        "GoogLeNet": ("Inception",),
        "Inception3": ("InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE"),
        "DenseNet": ("_DenseLayer",),
        "RegNet": ("ResBottleneckBlock",),
        "ShuffleNetV2": ("InvertedResidual",),
        "MNASNet": ("_InvertedResidual",),
        "ConvNeXt": ("CNBlock",),
        "SqueezeNet": ("Fire",),
    },
    "timm.models": {
        "HighResolutionNet": ("BasicBlock", "Bottleneck"),  # its group_matcher has only "block_types"
    },
}

logger = logging.getLogger(__name__)


class NoBlocksError(ValueError):
    """The discovery rules found no block to perturb in a model."""


@dataclass(frozen=True)
class Scope:
    """The modules of one block: a single module, or a run of siblings (conv, norm, activation)."""

    name: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Site:
    """One injection site: φ perturbs the input or output of `target`, on the `call`-th call of `target`
    within one pass through the block that runs from module `scope[0]` to module `scope[1]`."""

    name: str
    target: str
    position: str  # "input" or "output"
    call: int
    scope: tuple[str, str]
    channels: int
    rule: str
    channels_dim: int = 1  # 3 for a (B, H, W, C) map, which the hooks hand over as (B, C, H, W)

    @property
    def key(self) -> str:
        """The site's key under `model.metaperturb.sites` (module names cannot hold dots)."""
        return self.name.replace(".", "_")


def is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def is_activation(module: nn.Module) -> bool:
    return type(module).__module__ in ACTIVATION_MODULES and not isinstance(module, NOT_ACTIVATIONS)


def _has_state(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None or next(module.buffers(), None) is not None


def _is_block(module: nn.Module) -> bool:
    return not is_leaf(module) and has_conv(module)


def _innermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(o.startswith(n + ".") for o in names)]


def _full_match(pattern: str, name: str) -> bool:
    match = re.match(pattern, name)
    return match is not None and match.end() == len(name)


# -- the rules ----------------------------------------------------------------------------------------------


def _group_matcher_blocks(model: nn.Module) -> list[str]:
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        return []
    try:
        groups = matcher(coarse=False)
    except Exception:  # a family whose matcher needs other arguments: the next rule decides
        return []
    if callable(groups):
        return _matcher_function_blocks(model, groups)
    spec = groups.get("blocks") if isinstance(groups, dict) else None
    if isinstance(spec, str):
        patterns = [spec]
    elif isinstance(spec, (list, tuple)):
        patterns = [p[0] for p in spec if isinstance(p, (list, tuple)) and len(p) == 2 and p[1] is None]
    else:  # no "blocks" key (hrnet's "block_types")
        return []
    names = [n for n, m in model.named_modules() if n and _is_block(m) and any(_full_match(p, n) for p in patterns)]
    return _innermost(names)


def _matcher_function_blocks(model: nn.Module, group_of: object) -> list[str]:
    """Blocks from a matcher that maps module names to group ids: the deepest module holding all of a group's
    modules, where that is a conv-holding module below the root (a stem's layers share only the root)."""
    groups: dict[object, list[str]] = {}
    for name, module in model.named_modules():
        if name and next(module.parameters(recurse=False), None) is not None:
            groups.setdefault(group_of(name), []).append(name)
    modules = dict(model.named_modules())
    ancestors = [_common_ancestor(members) for members in groups.values()]
    return _innermost([n for n in ancestors if n and _is_block(modules[n])])


def _common_ancestor(names: list[str]) -> str:
    """The deepest module name that is, or contains, every one of `names` ("" for the root)."""
    common = []
    for level in zip(*(n.split(".") for n in names), strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _library(cls: type) -> str | None:
    return next((lib for lib in BLOCK_CLASSES if cls.__module__.startswith(lib + ".")), None)


def _block_class_blocks(model: nn.Module) -> list[str]:
    """The blocks of a network listed in `BLOCK_CLASSES`, or of a network subclassing one."""
    for cls in type(model).__mro__:
        library = _library(cls)
        kinds = BLOCK_CLASSES.get(library, {}).get(cls.__name__)
        if kinds:
            return [n for n, m in model.named_modules() if type(m).__name__ in kinds and _library(type(m)) == library]
    return []


def _container_blocks(model: nn.Module) -> list[str]:
    names = [
        f"{parent_name}.{child_name}" if parent_name else child_name
        for parent_name, parent in model.named_modules()
        if isinstance(parent, CONTAINERS)
        for child_name, child in parent.named_children()
        if _is_block(child)
    ]
    return _innermost(names)


def _conv_runs(model: nn.Module) -> list[Scope]:
    runs = []
    for parent_name, parent in model.named_modules():
        if parent is not model and not isinstance(parent, nn.Sequential):
            continue
        run: list[str] = []
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Conv2d):
                run = [name]
                runs.append(run)
            elif run and (isinstance(child, NORMS) or is_activation(child)):
                run.append(name)
            else:
                run = []
    return [Scope(r[0], tuple(r)) for r in runs]


def _user_blocks(model: nn.Module, blocks: BlocksSpec) -> list[str]:
    named = [(n, m) for n, m in model.named_modules() if n]
    if isinstance(blocks, str):
        names = [n for n, _ in named if _full_match(blocks, n)]
        what = f"regex {blocks!r}"
    elif isinstance(blocks, type) or (isinstance(blocks, tuple) and all(isinstance(b, type) for b in blocks)):
        names = [n for n, m in named if isinstance(m, blocks)]
        what = f"module types {blocks}"
    elif isinstance(blocks, Sequence) and all(isinstance(b, str) for b in blocks):
        known = dict(named)
        unknown = [b for b in blocks if b not in known]
        if unknown:
            raise ValueError(f"blocks= names modules that {type(model).__name__} does not have: {unknown}")
        names, what = list(blocks), "names"
    else:
        raise TypeError(
            "blocks= takes module names (a list of str), a regex matched against module names (str) or "
            f"module types (a type or tuple of types), got {type(blocks).__name__}"
        )
    if not names:
        raise NoBlocksError(f"blocks= {what} matched no module of {type(model).__name__}")
    nested = [n for n in names if any(o.startswith(n + ".") for o in names)]
    if nested:
        raise ValueError(f"blocks= selects modules that contain other selected modules: {nested}")
    return names


def find_block_scopes(model: nn.Module, blocks: BlocksSpec = None) -> tuple[list[Scope], str]:
    """The blocks of `model` and the name of the rule that found them (see the module docstring)."""
    if blocks is not None:
        return [Scope(n, (n,)) for n in _user_blocks(model, blocks)], "given"
    rules = (
        ("group_matcher", _group_matcher_blocks),
        ("block_classes", _block_class_blocks),
        ("containers", _container_blocks),
    )
    for rule, find in rules:
        names = find(model)
        if names:
            return [Scope(n, (n,)) for n in names], rule
    runs = _conv_runs(model)
    if runs:
        return runs, "conv_runs"
    raise NoBlocksError(_no_blocks_message(model))


def _no_blocks_message(model: nn.Module) -> str:
    kind = type(model).__name__
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    how = (
        "pass blocks= as a list of module names, a regex matched against module names, or block module types "
        "whose outputs are (B, C, H, W) feature maps"
    )
    if not convs:
        return (
            f"{kind} has no Conv2d layers, so it has no convolutional (B, C, H, W) feature maps for MetaPerturb "
            f"to perturb (transformers and MLPs are not supported); if it does have 4-D feature maps, {how}"
        )
    return (
        f"found no blocks in {kind}: no timm group_matcher blocks holding a Conv2d, no conv-holding module "
        f"inside an nn.Sequential/ModuleList/ModuleDict, no Conv2d directly in an nn.Sequential. Its Conv2d "
        f"layers are {', '.join(convs[:5])}{' ...' if len(convs) > 5 else ''}. To perturb after your blocks, {how}"
    )


# -- the probe -----------------------------------------------------------------------------------------------


@dataclass
class _ScopeRecord:
    leaves: list[tuple[str, tuple | None]] = field(default_factory=list)  # (leaf name, input shape) in run order
    output: object = None
    done: bool = False


def _shape(x: object) -> tuple | None:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) a timm model declares in its pretrained config, else ImageNet's (3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def _probe(model: nn.Module, scopes: list[Scope], input_size: tuple[int, ...]) -> dict[str, _ScopeRecord]:
    modules = dict(model.named_modules())
    records = {s.name: _ScopeRecord() for s in scopes}
    active: list[str | None] = [None]
    handles = []

    def enter(name):
        def hook(module, args):
            if not records[name].done:
                active[0] = name

        return hook

    def leave(name):
        def hook(module, args, output):
            if active[0] == name:
                records[name].output, records[name].done, active[0] = output, True, None

        return hook

    def leaf_ran(scope_name, leaf_name):
        def hook(module, args, output):
            if active[0] == scope_name:
                records[scope_name].leaves.append((leaf_name, _shape(args[0]) if args else None))

        return hook

    for s in scopes:
        handles.append(modules[s.modules[0]].register_forward_pre_hook(enter(s.name)))
        for member in s.modules:
            for leaf_name, leaf in modules[member].named_modules(prefix=member):
                if is_leaf(leaf):
                    handles.append(leaf.register_forward_hook(leaf_ran(s.name, leaf_name)))
        handles.append(modules[s.modules[-1]].register_forward_hook(leave(s.name)))

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    flags = {m: m.training for m in model.modules()}
    x = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    model.eval()
    try:  # the random state as it was: a probe must not change what a seeded run draws next (φ may be attached)
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model(x)
    except Exception as e:
        raise ValueError(
            f"MetaPerturb probes {type(model).__name__} with one forward pass of a dummy batch of shape "
            f"{tuple(x.shape)} to find its blocks' channels and closing activations, and that forward failed: "
            f"{type(e).__name__}: {str(e).rstrip('.')}. Pass input_size=(C, H, W) that the model accepts."
        ) from e
    finally:
        for h in handles:
            h.remove()
        for m, training in flags.items():
            m.training = training
    return records


def _closing_activation(leaves: list[tuple[str, tuple | None]], modules: dict[str, nn.Module]):
    """(index in leaves, call) of the last activation run, if only parameter-free leaves run after it."""
    for i in range(len(leaves) - 1, -1, -1):
        name = leaves[i][0]
        if is_activation(modules[name]):
            return i, sum(1 for n, _ in leaves[: i + 1] if n == name)
        if _has_state(modules[name]):
            return None
    return None


def _features(module: nn.Module) -> int | None:
    """How many features a layer's output holds, in the dimension it keeps them in."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return module.normalized_shape[-1]
    return getattr(module, "num_features", None) or getattr(module, "num_channels", None)


def _channels_dim(shape: tuple, leaves: list[tuple[str, tuple | None]], modules: dict[str, nn.Module]) -> int:
    """3 where the 4-D map of `shape` keeps its channels last: the last layer with parameters that ran before
    it has as many features as the map's last dimension and not as its second (a Linear on (B, H, W, C))."""
    features = next((_features(modules[n]) for n, _ in reversed(leaves) if _has_state(modules[n])), None)
    return 3 if features is not None and shape[1] != features and shape[-1] == features else 1


def _makes_output(shape: tuple | None, output: object) -> bool:
    """Whether a 4-D map of `shape` can be the block's output, or one of its outputs, up to pooling after it (the
    same batch and channels): the closing activation of a block that concatenates branches (Inception) is only
    its last branch's."""
    outputs = output if isinstance(output, (list, tuple)) else [output]
    shapes = [_shape(o) for o in outputs]
    return shape is not None and len(shape) == 4 and any(s is not None and s[:2] == shape[:2] for s in shapes)


def _place(scope: Scope, record: _ScopeRecord, modules: dict[str, nn.Module], placement: str, rule: str):
    """The block's site: before its closing activation (pre_activation) where that reads the block's 4-D map,
    else at its output where that is 4-D; None where neither is."""
    closing = _closing_activation(record.leaves, modules) if placement == "pre_activation" else None
    if closing is not None and _makes_output(record.leaves[closing[0]][1], record.output):
        (target, shape), call, position = record.leaves[closing[0]], closing[1], "input"
        before = record.leaves[: closing[0]]
    else:
        target, shape, call, position, before = scope.modules[-1], _shape(record.output), 1, "output", record.leaves
        if shape is None or len(shape) != 4:
            return None
    dim = _channels_dim(shape, before, modules)
    return Site(scope.name, target, position, call, (scope.modules[0], scope.modules[-1]), shape[dim], rule, dim)


def discover_sites(
    model: nn.Module,
    blocks: BlocksSpec = None,
    placement: str = "pre_activation",
    input_size: tuple[int, ...] | None = None,
) -> list[Site]:
    """Find the blocks of `model` and probe it once to place one site in each."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    scopes, rule = find_block_scopes(model, blocks)
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    records = _probe(model, scopes, input_size)
    modules = dict(model.named_modules())
    kind = type(model).__name__
    sites, not_run, no_map = [], [], []
    for s in scopes:
        record = records[s.name]
        site = _place(s, record, modules, placement, rule) if record.done else None
        if site is not None:
            sites.append(site)
        elif not record.done:
            not_run.append(s.name)
        else:
            out = _shape(record.output) or type(record.output).__name__
            no_map.append(f"'{s.name}' ({type(modules[s.modules[-1]]).__name__}) outputs {out}")
    if rule == "given" and not_run:
        raise ValueError(
            f"block '{not_run[0]}' of {kind} did not run in a forward pass; pass blocks= with modules that the "
            "forward uses"
        )
    if (rule == "given" or not sites) and no_map:
        raise (ValueError if rule == "given" else NoBlocksError)(
            f"block {no_map[0]}, not a (B, C, H, W) feature map: MetaPerturb perturbs convolutional feature maps; "
            "pass blocks= with modules whose outputs are 4-D"
        )
    if not sites:
        raise NoBlocksError(f"none of the blocks of {kind} ran in a forward pass: {not_run}; pass blocks=")
    if not_run:
        logger.info("%s: blocks left out, the forward does not run them: %s", kind, ", ".join(not_run))
    if no_map:
        warnings.warn(
            f"MetaPerturb leaves out {len(no_map)} block(s) of {kind} with no (B, C, H, W) feature map to perturb: "
            f"{'; '.join(no_map)}. The other {len(sites)} blocks are perturbed.",
            stacklevel=3,
        )
    keys = [site.key for site in sites]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two sites share a key after replacing dots by underscores: {keys}")
    return sites
