"""The experiment's configuration: a small TOML file, read with tomllib, checked into dataclasses.

``TEMPLATE`` is what ``rt-experiment init`` writes: the paper's design (recognizers trained on
renders, on translated renders and on photos; verification on photo-style faces of other
people and on a render-style control) at the scale of the sample world, with the paper's
full-scale values in comments. Relative paths in a config file are relative to that file.

Identity ranges of the sample world (one seed, ``first_identity`` offsets, so no two sets share
an identity or a folder name):

    train   [0, T)                renders the recognizers train on (and their photo twins: the
                                  upper-bound arm); the translators' source domain
    target  [T, T+G)              photo-style images the translators learn the style from
    val     [T+G, T+G+V)          renders and photos for the translators' held-out style gap
    test    [T+G+V, T+G+V+E)      the benchmarks: photo style, and the same faces as renders
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rtkit.engines.errors import MissingDependency, RtkitError

ARM_RAW = "raw"
ARM_UPPER = "photo"
DATA_SETS = ("train", "target", "upper", "val_source", "val_target", "test_photo", "test_render")


class ConfigError(RtkitError, ValueError):
    """An experiment file that cannot be used as it is."""


@dataclass
class WorldConfig:
    """The procedural sample world (rtkit.datasets.sample) the sets are drawn from."""

    seed: int = 0
    size: int = 64
    per_identity: int = 8
    train_identities: int = 100
    target_identities: int = 100
    target_per_identity: int = 4
    val_identities: int = 16
    val_per_identity: int = 4
    test_identities: int = 40

    def ranges(self) -> dict[str, tuple[int, int, int]]:
        """set -> (first identity, identities, images each)."""
        t, g, v = self.train_identities, self.target_identities, self.val_identities
        return {"train": (0, t, self.per_identity), "target": (t, g, self.target_per_identity),
                "val": (t + g, v, self.val_per_identity),
                "test": (t + g + v, self.test_identities, self.per_identity)}


@dataclass
class TranslatorPlan:
    """One translator arm: trained from a preset with overrides, or a given engine file."""

    method: str
    engine: str | None = None        # use this translator (weights with card, .onnx) instead of training
    fields: dict = field(default_factory=dict)   # TranslatorConfig fields over the preset
    options: dict = field(default_factory=dict)  # method options over the preset's


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    out: str = "experiment-out"
    seeds: tuple[int, ...] = (0, 1, 2)
    upper_bound: bool = True
    threads: int = 1                 # torch intra-op threads (1: fastest for tiny nets on shared cores)
    device: str = "cpu"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: dict = field(default_factory=dict)          # set name -> user folder (replaces the world's set)
    translator_preset: str = "tiny"
    translator_defaults: dict = field(default_factory=dict)
    translators: list[TranslatorPlan] = field(default_factory=list)
    convert_batch_size: int = 16
    recognizer: dict = field(default_factory=dict)    # rtkit.train.recognizer.RecognizerConfig fields
    folds: int = 10
    pairs_per_fold: int = 200
    pairs_seed: int = 0
    flip: bool = True
    bins: dict = field(default_factory=dict)          # benchmark name -> user .bin
    sheet_count: int = 16
    identity_check: bool = True
    base_dir: str = "."                               # folder relative paths are resolved against

    def path(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def arms(self) -> list[str]:
        arms = [ARM_RAW] + [t.method for t in self.translators]
        return arms + ([ARM_UPPER] if self.upper_bound else [])


# -- reading ------------------------------------------------------------------------------------

def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise MissingDependency("reading experiment files on Python 3.10 needs tomli: pip install tomli") from None
    return tomllib


def _take(table: dict, where: str, known: dict[str, type]) -> dict:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = {}
    for k, v in table.items():
        want = known[k]
        ok = (isinstance(v, want) and not (want is int and isinstance(v, bool))) if want is not float \
            else isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            raise ConfigError(f"[{where}] {k} = {v!r}: expected {want.__name__}")
        out[k] = float(v) if want is float else v
    return out


def parse_config(doc: dict, base_dir: str | Path = ".") -> ExperimentConfig:
    """An ExperimentConfig from a parsed TOML document (``base_dir``: where relative paths start)."""
    top = set(doc) - {"experiment", "world", "data", "translators", "convert", "recognizer", "benchmarks",
                      "report"}
    if top:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(top))}")
    for k, v in doc.items():
        if not isinstance(v, dict):
            raise ConfigError(f"{k} must be a [section], got {v!r}")
    cfg = ExperimentConfig(base_dir=str(base_dir))
    ex = _take(doc.get("experiment", {}), "experiment",
               {"name": str, "out": str, "seeds": list, "upper_bound": bool, "threads": int, "device": str})
    for k, v in ex.items():
        setattr(cfg, k, v)
    seeds = ex.get("seeds", list(cfg.seeds))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"[experiment] seeds must be distinct non-negative integers, got {seeds!r}")
    cfg.seeds = tuple(seeds)
    if cfg.threads < 1:
        raise ConfigError(f"[experiment] threads must be >= 1, got {cfg.threads}")

    world_types = {f.name: int for f in dataclasses.fields(WorldConfig)}
    cfg.world = WorldConfig(**_take(doc.get("world", {}), "world", world_types))
    for k, v in dataclasses.asdict(cfg.world).items():
        if v < (0 if k == "seed" else 1):
            raise ConfigError(f"[world] {k} must be {'>= 0' if k == 'seed' else '>= 1'}, got {v}")
    if not 32 <= cfg.world.size <= 1024:
        raise ConfigError(f"[world] size must be 32..1024 pixels, got {cfg.world.size}")

    cfg.data = _take(doc.get("data", {}), "data", {k: str for k in DATA_SETS})

    tr = dict(doc.get("translators", {}))
    methods = tr.pop("methods", ["decent"])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods) \
            or len(set(methods)) != len(methods):
        raise ConfigError(f"[translators] methods must be a list of distinct names, got {methods!r}")
    if ARM_RAW in methods or ARM_UPPER in methods:
        raise ConfigError(f"[translators] methods may not be called {ARM_RAW!r} or {ARM_UPPER!r} (arm names)")
    cfg.translator_preset = tr.pop("preset", cfg.translator_preset)
    per_method = {m: tr.pop(m) for m in list(tr) if isinstance(tr[m], dict)}
    cfg.translator_defaults = _translator_fields(tr, "translators")
    for m in per_method:
        if m not in methods:
            raise ConfigError(f"[translators.{m}] configures a method not in methods = {methods!r}")
    for m in methods:
        t = dict(per_method.get(m, {}))
        engine = t.pop("engine", None)
        if engine is not None and not isinstance(engine, str):
            raise ConfigError(f"[translators.{m}] engine must be a path")
        opts = t.pop("options", {})
        if not isinstance(opts, dict):
            raise ConfigError(f"[translators.{m}] options must be a table")
        cfg.translators.append(TranslatorPlan(m, engine, _translator_fields(t, f"translators.{m}"), opts))

    conv = _take(doc.get("convert", {}), "convert", {"batch_size": int})
    cfg.convert_batch_size = conv.get("batch_size", cfg.convert_batch_size)
    cfg.recognizer = _recognizer_fields(doc.get("recognizer", {}))

    bench = dict(doc.get("benchmarks", {}))
    bins = bench.pop("bins", {})
    if not isinstance(bins, dict) or not all(isinstance(v, str) for v in bins.values()):
        raise ConfigError("[benchmarks] bins must be a table of name = \"path/to/file.bin\"")
    bench = _take(bench, "benchmarks", {"folds": int, "pairs_per_fold": int, "seed": int, "flip": bool})
    cfg.folds = bench.get("folds", cfg.folds)
    cfg.pairs_per_fold = bench.get("pairs_per_fold", cfg.pairs_per_fold)
    cfg.pairs_seed = bench.get("seed", cfg.pairs_seed)
    cfg.flip = bench.get("flip", cfg.flip)
    for name in bins:
        if name in ("photo", "render") or not name.replace("_", "").isalnum():
            raise ConfigError(f"[benchmarks.bins] {name!r}: use a plain name other than photo/render")
    cfg.bins = bins

    rep = _take(doc.get("report", {}), "report", {"sheet_count": int, "identity_check": bool})
    cfg.sheet_count = rep.get("sheet_count", cfg.sheet_count)
    cfg.identity_check = rep.get("identity_check", cfg.identity_check)
    if "upper" in cfg.data and not cfg.upper_bound:
        raise ConfigError("[data] upper is given but [experiment] upper_bound = false")
    return cfg


def _translator_fields(table: dict, where: str) -> dict:
    from rtkit.train.translator_config import TranslatorConfig

    fixed = {"method", "source", "target", "val_source", "val_target", "preset", "device"}
    fields = {f.name for f in dataclasses.fields(TranslatorConfig)} - fixed
    unknown = sorted(set(table) - fields - {"options"})
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {', '.join(unknown)} (TranslatorConfig fields, e.g. "
                          f"steps, batch_size, crop_size, val_every, seed, options)")
    return dict(table)


def _recognizer_fields(table: dict) -> dict:
    from rtkit.train.recognizer import RecognizerConfig

    fixed = {"data", "seed", "device", "val_bins", "progress"}
    bad = sorted(set(table) & fixed)
    if bad:
        raise ConfigError(f"[recognizer] {', '.join(bad)} are set by the experiment (data per arm, seeds "
                          f"from [experiment], benchmarks from [benchmarks])")
    try:
        RecognizerConfig.from_dict(dict(table)).check()
    except TypeError as e:
        raise ConfigError(f"[recognizer]: {e}") from None
    return dict(table)


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        doc = _tomllib().loads(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file") from None
    except Exception as e:  # tomllib.TOMLDecodeError
        raise ConfigError(f"{path}: {e}") from None
    return parse_config(doc, base_dir=path.resolve().parent)


def write_template(path: str | Path, *, force: bool = False) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "experiment.toml"
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TEMPLATE)
    return path


TEMPLATE = """\
# rt-experiment: what realism transfer does to face recognition (the paper's Table 2 design).
#
# Recognizers with identical settings are trained on (1) the renders as they are, (2) the renders
# converted by each translator, (3) photo-style images of the same identities (the upper bound),
# each over several seeds, and verified on photo-style faces of people none of them saw, and on
# the same faces rendered (a control: a gain there too is not domain adaptation).
# Translators are UNPAIRED: source = the training renders, target = photo-style images of OTHER
# identities, never the test ones. Run: rt-experiment run experiment.toml   (resumable: run it
# again after a crash or Ctrl-C; finished stages are never redone).
#
# This file runs on the procedural sample world in about 10-20 minutes on 2 CPU cores. The
# paper's scale is in the comments (DigiFace-1M, AdaFace IR-50, the five .bin benchmarks).

[experiment]
name = "sample-world"
out = "experiment-out"        # relative to this file
seeds = [0, 1, 2]             # recognizer seeds (paper: 3 runs)
upper_bound = true            # also train on photo-style images of the training identities
threads = 1                   # torch threads; 1 is fastest for tiny networks on shared cores
device = "cpu"                # paper: "cuda"

[world]                       # sample world (rt-sample); identities never shared between sets
seed = 0
size = 64                     # pixels (paper: 112)
per_identity = 8              # train and test images per identity
train_identities = 100        # paper: DigiFace-1M (10 K identities x 72 images)
target_identities = 100       # photo-style images of other people: the translators' target
target_per_identity = 4
val_identities = 16           # held-out renders/photos: the translators' style gap, best checkpoint
val_per_identity = 4
test_identities = 40          # the benchmarks' people

[data]                        # your own folders (<root>/<identity>/<image>) replace the world's sets
# train = "data/DigiFace1M"             # source renders
# target = "data/FFHQ_aligned"          # real faces of other identities (translator target)
# upper = "data/real_same_identities"   # optional upper bound
# val_source = "data/renders_val"
# val_target = "data/real_val"
# test_photo = "data/real_test"         # a benchmark is made from it (make-pairs + make-bin)
# test_render = "data/renders_test"

[translators]                 # rtkit-trained, unpaired; any TranslatorConfig field can be set here
methods = ["decent"]          # paper: ["vsait", "decent", "unsb"] (+ CodeFormer, DDIM, Digi2Real engines)
preset = "tiny"               # rtkit.train.presets; "none": the published recipe (the paper's)
steps = 600
crop_size = 64
val_every = 50                # held-out style gap every N steps; the lowest gap is kept as "best"
save_every = 100
workers = 0                   # decode processes (0: in the training process)
seed = 0

# [translators.vsait]
# steps = 300
# options = { hv_dim = 256 }
# [translators.codeformer]
# engine = "engines/codeformer.onnx"   # a given translator instead of training one

[convert]
batch_size = 16

[recognizer]                  # rtkit.train.recognizer.RecognizerConfig fields, the same for every arm
backbone = "adaface_tiny"     # paper: "adaface_ir50"
head = "adaface"
image_size = 48               # multiple of 16 (paper: 112)
batch_size = 32               # paper: 256
epochs = 16                   # the schedule; max_steps shortens it (paper: 30 epochs)
milestones = [10, 13, 15]     # paper: [12, 20, 26]
max_steps = 300
lr = 0.1
workers = 0
log_every_steps = 100
keep_checkpoints = 1

[benchmarks]                  # made from the test identities: photo.bin and render.bin
folds = 10
pairs_per_fold = 200          # half genuine, half impostor (LFW: 600)
seed = 0
flip = true
# bins = { lfw = "data/faces_bins/lfw.bin", cfp_fp = "data/faces_bins/cfp_fp.bin" }

[report]
sheet_count = 16              # before/after pairs on each translator's sheet
identity_check = true         # identity kept by each conversion, seen by the seed-0 raw recognizer
"""


__all__ = ["ExperimentConfig", "WorldConfig", "TranslatorPlan", "ConfigError", "parse_config", "load_config",
           "write_template", "TEMPLATE", "ARM_RAW", "ARM_UPPER", "DATA_SETS"]
