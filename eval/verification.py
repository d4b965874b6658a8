"""Pair verification benchmarks in insightface's .bin format (LFW, CFP-FP, CPLFW, CALFW, AgeDB-30).

A .bin is a pickle of ``(bins, issame_list)``: ``bins`` holds 2N encoded images (JPEG or PNG
bytes), pair i being ``bins[2i]`` and ``bins[2i+1]``; ``issame_list`` holds N booleans. Files
written by Python 2 need ``encoding='bytes'``. We read them without mxnet, through an
unpickler that only accepts what such a file holds (lists, tuples, bytes, booleans, numpy
arrays), so a .bin cannot run code, and that refuses any allocation larger than the file, so a
few bytes cannot ask for gigabytes.

The protocol is insightface's: the embedding of an image and of its horizontal flip are summed
and L2-normalised; distance is squared L2; thresholds ``np.arange(0, 4, 0.01)``; ten contiguous
folds; for each fold the threshold with the best accuracy on the other nine (first one on
ties) is applied to it; accuracy is reported as mean and (population) std over the folds.
Along the way insightface computes, and we also report, the accuracy on the other folds at
each chosen threshold and the TPR/FPR at every threshold averaged over the held-out folds.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from rtkit.engines.errors import RtkitError
from rtkit.eval.results import new_result

BENCHMARKS = ("lfw", "cfp_fp", "cplfw", "calfw", "agedb_30")
BENCHMARK_TITLES = {"lfw": "LFW", "cfp_fp": "CFP-FP", "cplfw": "CPLFW", "calfw": "CALFW",
                    "agedb_30": "AgeDB"}
THRESHOLDS = np.arange(0, 4, 0.01)
N_FOLDS = 10


class BenchmarkError(RtkitError, ValueError):
    """A benchmark file that is missing, corrupt or not in the expected format."""


# -- reading and writing .bin files -----------------------------------------------------------

# What a verification .bin may reference, and nothing else: byte strings pickled by Python 3
# with protocol 2 go through _codecs.encode (and bytearrays through bytearray), and some files
# hold numpy arrays or scalars. Each is replaced by a checked stand-in that refuses to allocate
# more than the file could hold, so a few bytes cannot ask for gigabytes (bytearray(10**9),
# an array of a huge declared shape).

class _Refused(pickle.UnpicklingError):
    """Something a verification .bin never holds, or an allocation it could not justify."""


class _LoadedArray(np.ndarray):
    """An array being read from a .bin: its pickled state is checked before numpy allocates it."""

    def __setstate__(self, state):
        limit = self.__dict__.get("_rtkit_limit", 0)
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("it holds an array with an unexpected state")
        shape, dtype = state[-4], state[-3]
        if not isinstance(dtype, np.dtype):
            raise _Refused("it holds an array without a dtype")
        _check_allocation(shape, dtype, limit, "an array")
        super().__setstate__(state)


def _check_allocation(shape, dtype: np.dtype, limit: int, what: str) -> None:
    """Refuse an allocation larger than the file: the data of a genuine array is in the file,
    and each element of an object array costs at least one byte of it."""
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise _Refused(f"it holds {what} with an invalid shape")
    count = 1
    for n in shape:
        count *= n
    size = count * (1 if dtype.hasobject else dtype.itemsize)
    if size > limit:
        raise _Refused(f"it asks for {what} of {size} bytes from a {limit}-byte file; "
                       f"refusing to allocate it")


class _NdarrayMarker:
    """Stands for numpy.ndarray in a pickle: _reconstruct takes it as the class to build;
    calling it (ndarray(shape) allocates from a number) is refused."""

    def __call__(self, *args, **kwargs):
        raise _Refused("it calls numpy.ndarray directly, which allocates from a shape instead "
                       "of file content")


_NDARRAY = _NdarrayMarker()
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]          # what arrays pickle through
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]             # what numpy scalars pickle through
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]       # arrays pickled with protocol 5
_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")


class _BinUnpickler(pickle.Unpickler):
    def __init__(self, file, limit: int):
        super().__init__(file, encoding="bytes")
        self.limit = limit
        guarded = {"encode": self._encode, "bytearray": self._bytearray, "dtype": self._dtype,
                   "ndarray": _NDARRAY, "_reconstruct": self._reconstruct,
                   "scalar": self._scalar, "_frombuffer": self._frombuffer}
        self.allowed = {}
        for module, name in (("_codecs", "encode"), ("builtins", "bytearray"),
                             ("__builtin__", "bytearray"), ("numpy", "ndarray"),
                             ("numpy", "dtype")):
            self.allowed[module, name] = guarded[name]
        for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 module names
            for name in ("_reconstruct", "scalar"):
                self.allowed[f"{core}.multiarray", name] = guarded[name]
            self.allowed[f"{core}.numeric", "_frombuffer"] = guarded["_frombuffer"]

    def find_class(self, module, name):
        try:
            return self.allowed[module, name]
        except KeyError:
            raise _Refused(f"it references {module}.{name}, which a verification .bin never "
                           f"holds; refusing to load it") from None

    def _encode(self, obj, encoding="utf-8", errors="strict"):
        if not isinstance(obj, str) or str(encoding).lower() not in _LATIN1:
            raise _Refused("it encodes something other than a latin-1 string")
        return obj.encode("latin-1", errors)

    def _bytearray(self, source=b"", *args):
        # bytearray(n) allocates n zero bytes: a pickle may only rebuild one from its content.
        if not isinstance(source, (bytes, bytearray, str)):
            raise _Refused(f"it calls bytearray({type(source).__name__}), which allocates "
                           f"from a number instead of file content")
        if isinstance(source, str):
            return bytearray(self._encode(source, *(args or ("latin-1",))))
        if args:
            raise _Refused("it calls bytearray with an encoding for bytes")
        return bytearray(source)

    def _dtype(self, obj, align=False, copy=False):
        if not isinstance(obj, (str, bytes)):
            raise _Refused("it builds a numpy dtype from something other than a name")
        dt = np.dtype(obj.decode("latin-1") if isinstance(obj, bytes) else obj, align=bool(align))
        _check_allocation((), dt, self.limit, "a numpy element")
        return dt

    def _reconstruct(self, cls, shape, dtype):
        if cls is not _NDARRAY:
            raise _Refused("it rebuilds an array of a class other than numpy.ndarray")
        dt = dtype if isinstance(dtype, np.dtype) else self._dtype(dtype)
        _check_allocation(shape, dt, self.limit, "an array")
        arr = _NUMPY_RECONSTRUCT(_LoadedArray, shape, dt)
        arr._rtkit_limit = self.limit
        return arr

    def _scalar(self, dtype, *args):
        if not isinstance(dtype, np.dtype):
            raise _Refused("it builds a numpy scalar without a dtype")
        _check_allocation((), dtype, self.limit, "a numpy scalar")
        return _NUMPY_SCALAR(dtype, *args)

    def _frombuffer(self, buf, dtype, shape, order):
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise _Refused("it builds an array from a buffer without a plain dtype")
        _check_allocation(shape, dtype, self.limit, "an array")
        return _NUMPY_FROMBUFFER(buf, dtype, shape, order)


@dataclass
class VerificationSet:
    """The decoded-on-demand content of a .bin file."""

    name: str                 # benchmark name, from the file name (lfw.bin -> "lfw")
    path: Path
    images: list[bytes]       # 2N encoded images
    issame: np.ndarray        # N booleans
    sha256: str = ""

    @property
    def n_pairs(self) -> int:
        return int(self.issame.size)


def load_bin(path: str | Path) -> VerificationSet:
    """Read an insightface verification .bin, checking its structure.

    Raises BenchmarkError (one line) for a missing, truncated or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"verification file not found: {path}")
    data = path.read_bytes()
    try:
        obj = _BinUnpickler(io.BytesIO(data), limit=len(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            AttributeError, LookupError, MemoryError, OverflowError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = "refused" if isinstance(e, _Refused) else "corrupt or truncated pickle"
        raise BenchmarkError(f"{path} is not a valid verification .bin ({what}: {reason})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise BenchmarkError(f"{path} is not a verification .bin: expected a pickled "
                             f"(images, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    try:
        images = [bytes(b.tobytes() if isinstance(b, np.ndarray) else b) for b in bins]
        issame = np.asarray(issame, dtype=bool).reshape(-1)
    except (TypeError, ValueError) as e:
        raise BenchmarkError(f"{path} is not a verification .bin: its images must be encoded "
                             f"bytes and its labels booleans ({e})") from None
    if issame.size == 0 or len(images) != 2 * issame.size:
        raise BenchmarkError(f"{path} is not a verification .bin: {len(images)} images for "
                             f"{issame.size} pairs (expected 2 per pair)")
    return VerificationSet(name=benchmark_name(path), path=path, images=images, issame=issame,
                           sha256=hashlib.sha256(data).hexdigest())


def benchmark_name(path: str | Path) -> str:
    return Path(path).stem.lower()


def decode_image(data: bytes, *, what: str = "image") -> np.ndarray:
    """Encoded JPEG/PNG bytes -> HxWx3 uint8 RGB, or BenchmarkError."""
    img = None
    if data:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise BenchmarkError(f"{what} is not a decodable image ({len(data)} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_pairs(pairs_file: str | Path) -> list[tuple[str, str, bool]]:
    """Lines ``relpath1 relpath2 1|0``; blank lines and '#' comments are skipped."""
    pairs_file = Path(pairs_file)
    if not pairs_file.is_file():
        raise BenchmarkError(f"pairs file not found: {pairs_file}")
    pairs = []
    for n, line in enumerate(pairs_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[2] not in ("0", "1"):
            raise BenchmarkError(f"{pairs_file}:{n}: expected 'relpath1 relpath2 1|0', "
                                 f"got {line!r}")
        pairs.append((parts[0], parts[1], parts[2] == "1"))
    if not pairs:
        raise BenchmarkError(f"{pairs_file} lists no pairs")
    return pairs


def build_bin(image_root: str | Path, pairs_file: str | Path, out_bin: str | Path) -> int:
    """Write a .bin from a folder of (aligned) face images and a pairs list; returns the pair count.

    The image files are stored as they are (no re-encoding), after checking that each decodes.
    """
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise BenchmarkError(f"image folder not found: {image_root}")
    pairs = read_pairs(pairs_file)
    images, issame, cache = [], [], {}
    for a, b, same in pairs:
        for rel in (a, b):
            if rel not in cache:
                p = image_root / rel
                if not p.is_file():
                    raise BenchmarkError(f"image listed in {pairs_file} not found: {p}")
                data = p.read_bytes()
                decode_image(data, what=str(p))
                cache[rel] = data
            images.append(cache[rel])
        issame.append(same)
    out_bin = Path(out_bin)
    out_bin.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_bin.with_name(out_bin.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump((images, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(out_bin)
    return len(pairs)


# -- the 10-fold protocol ---------------------------------------------------------------------

def check_n_folds(n_folds: int) -> None:
    """BenchmarkError (one line) unless ``n_folds`` >= 2: each fold's threshold is chosen on
    the other folds, so a single fold has nothing to choose it on."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise BenchmarkError(f"the verification protocol needs 2 or more folds, got {n_folds}")


def check_folds(n: int, n_folds: int = N_FOLDS) -> None:
    """BenchmarkError (one line) unless ``n`` pairs can be split into ``n_folds`` >= 2 folds."""
    check_n_folds(n_folds)
    if n < n_folds:
        raise BenchmarkError(f"{n} pairs cannot be split into {n_folds} folds")


def kfold_splits(n: int, n_folds: int = N_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous (train, test) index splits; the first ``n % n_folds`` folds get one extra
    item (the layout of sklearn's KFold without shuffling)."""
    check_folds(n, n_folds)
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    bounds = np.r_[0, np.cumsum(sizes)]
    idx = np.arange(n)
    return [(np.r_[idx[:lo], idx[hi:]], idx[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, with the arithmetic of sklearn.preprocessing.normalize
    (einsum norms; near-zero norms treated as 1) so results match insightface bit for bit."""
    x = np.array(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    x /= norms[:, None]
    return x


def fuse_flip(views: np.ndarray) -> np.ndarray:
    """(V, N, D) embeddings of each view (original, flipped) -> (N, D) float64 unit vectors,
    summed in float64 as insightface does. A 2-D array is a single view."""
    views = np.asarray(views)
    emb = views.astype(np.float64)
    if emb.ndim == 3:
        emb = emb[0] + emb[1] if emb.shape[0] == 2 else emb.sum(axis=0)
    return l2_normalize(emb)


@dataclass
class FoldAccuracy:
    """insightface's calculate_roc on one benchmark, with what it computes along the way."""

    accuracy: float                 # mean over folds
    std: float                      # population std over folds
    fold_accuracies: list[float] = field(default_factory=list)
    fold_thresholds: list[float] = field(default_factory=list)
    # Accuracy on the other folds at the chosen threshold (the best one there).
    fold_train_accuracies: list[float] = field(default_factory=list)
    # TPR and FPR at every threshold, each the mean over the held-out folds (insightface's
    # returned tpr, fpr); a fold without genuine (impostor) pairs counts TPR (FPR) 0 there.
    tpr: np.ndarray | None = None
    fpr: np.ndarray | None = None


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance of rows 2i and 2i+1."""
    diff = np.subtract(embeddings[0::2], embeddings[1::2])
    return np.sum(np.square(diff), 1)


def _rates(accepted: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TPR and FPR at each threshold (rows of ``accepted``), 0 where a class is absent."""
    tp = np.count_nonzero(accepted & same, axis=1)
    fp = np.count_nonzero(accepted & ~same, axis=1)
    n_same = int(np.count_nonzero(same))
    n_diff = same.size - n_same
    tpr = tp / n_same if n_same else np.zeros(tp.size)
    fpr = fp / n_diff if n_diff else np.zeros(fp.size)
    return tpr, fpr


def fold_accuracy(embeddings: np.ndarray, issame, n_folds: int = N_FOLDS,
                  thresholds: np.ndarray = THRESHOLDS) -> FoldAccuracy:
    """insightface's verification accuracy on normalised embeddings (2N rows, pairs adjacent)."""
    issame = np.asarray(issame, dtype=bool)
    dist = pair_distances(np.asarray(embeddings))
    n = min(issame.size, dist.size)
    dist, issame = dist[:n], issame[:n]
    splits = kfold_splits(n, n_folds)
    accepted = dist[None, :] < thresholds[:, None]      # (thresholds, pairs), accept when below
    correct = accepted == issame[None, :]
    accs, best, train_accs = [], [], []
    tprs = np.zeros((n_folds, thresholds.size))
    fprs = np.zeros((n_folds, thresholds.size))
    for f, (train, test) in enumerate(splits):
        # Correct-decision counts compare exactly; argmax takes the first best threshold.
        train_correct = correct[:, train].sum(axis=1)
        b = int(np.argmax(train_correct))
        best.append(float(thresholds[b]))
        train_accs.append(float(train_correct[b]) / train.size)
        accs.append(float(correct[b, test].sum()) / test.size)
        tprs[f], fprs[f] = _rates(accepted[:, test], issame[test])
    accs_arr = np.asarray(accs)
    return FoldAccuracy(float(np.mean(accs_arr)), float(np.std(accs_arr)), accs, best, train_accs,
                        np.mean(tprs, 0), np.mean(fprs, 0))


# -- running a recognizer over a .bin ---------------------------------------------------------

EMBED_PIPELINE = "verification-bin-v1"   # part of the cache key: bump when decoding changes


def embed_bin(embedder, vset: VerificationSet, *, flip: bool = True) -> np.ndarray:
    """Per-view embeddings (V, 2N, D) float32 of a .bin's images, through the cache."""

    def load(i: int) -> np.ndarray:
        return decode_image(vset.images[i], what=f"{vset.path} image {i}")

    key = f"{EMBED_PIPELINE}:{vset.sha256}"
    return embedder.embed_cached(key, len(vset.images), load, flip=flip, desc=vset.name)


def evaluate_bin(embedder, path: str | Path, *, flip: bool = True, n_folds: int = N_FOLDS) -> dict:
    """Accuracy of a recognizer on one .bin: a JSON-ready dict."""
    vset = load_bin(path)
    check_folds(vset.n_pairs, n_folds)
    views = embed_bin(embedder, vset, flip=flip)
    embeddings = fuse_flip(views)
    res = fold_accuracy(embeddings, vset.issame, n_folds)
    xnorm = float(np.linalg.norm(views.astype(np.float64), axis=-1).mean())
    return {
        "file": str(vset.path), "sha256": vset.sha256, "pairs": vset.n_pairs,
        "accuracy": res.accuracy, "std": res.std,
        "fold_accuracies": res.fold_accuracies, "fold_thresholds": res.fold_thresholds,
        "fold_train_accuracies": res.fold_train_accuracies,
        "roc_mean_over_folds": {"thresholds": "np.arange(0, 4, 0.01)", "tpr": res.tpr.tolist(),
                                "fpr": res.fpr.tolist()},
        "xnorm": xnorm, "flip": flip,
    }


def five_benchmark_average(benchmarks: dict[str, dict]) -> float | None:
    """Mean accuracy over LFW, CFP-FP, CPLFW, CALFW and AgeDB-30, or None if one is missing."""
    if not all(b in benchmarks for b in BENCHMARKS):
        return None
    return float(np.mean([benchmarks[b]["accuracy"] for b in BENCHMARKS]))


def expand_bin_paths(paths) -> list[Path]:
    """Files as given; a folder stands for the five standard benchmarks found in it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [p / f"{b}.bin" for b in BENCHMARKS if (p / f"{b}.bin").is_file()]
            if not found:
                raise BenchmarkError(f"no benchmark .bin ({', '.join(BENCHMARKS)}) in {p}")
            out.extend(found)
        else:
            out.append(p)
    names = [benchmark_name(p) for p in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchmarkError(f"benchmark named twice: {', '.join(dup)} (names come from file names)")
    return out


def run_verification(embedder, paths, *, flip: bool = True, n_folds: int = N_FOLDS,
                     label: str | None = None, run: str | None = None) -> dict:
    """Evaluate ``embedder`` on each .bin; the result document (see rtkit.eval.results)."""
    check_n_folds(n_folds)  # before anything is read
    paths = expand_bin_paths(paths)
    for p in paths:  # fail before hours of embedding if a later file is missing
        if not p.is_file():
            raise BenchmarkError(f"verification file not found: {p}")
    benchmarks = {}
    for p in paths:
        benchmarks[benchmark_name(p)] = evaluate_bin(embedder, p, flip=flip, n_folds=n_folds)
    doc = new_result("verification", embedder, label=label, run=run)
    doc["protocol"] = {"folds": n_folds, "thresholds": "np.arange(0, 4, 0.01)",
                       "distance": "squared L2 of L2-normalised (image + flip) embeddings",
                       "std": "population std over folds"}
    doc["benchmarks"] = benchmarks
    doc["average"] = five_benchmark_average(benchmarks)
    return doc


def format_verification(doc: dict) -> str:
    """A small text table of a verification result document."""
    rows = [f"{'benchmark':<10} {'pairs':>6}  accuracy (%)"]
    for name, b in doc["benchmarks"].items():
        rows.append(f"{name:<10} {b['pairs']:>6}  {100 * b['accuracy']:.2f} +- {100 * b['std']:.2f}")
    if doc.get("average") is not None:
        rows.append(f"{'average':<10} {'':>6}  {100 * doc['average']:.2f} (five benchmarks)")
    elif len(doc["benchmarks"]) > 1:
        names = list(doc["benchmarks"])
        mean = float(np.mean([doc["benchmarks"][b]["accuracy"] for b in names]))
        rows.append(f"{'average':<10} {'':>6}  {100 * mean:.2f} (of the {len(names)} given: "
                    f"{', '.join(names)})")
    return "\n".join(rows)


__all__ = ["BENCHMARKS", "BENCHMARK_TITLES", "BenchmarkError", "VerificationSet", "load_bin",
           "decode_image", "read_pairs", "build_bin", "check_n_folds", "check_folds",
           "kfold_splits", "l2_normalize", "fuse_flip", "FoldAccuracy", "pair_distances",
           "fold_accuracy", "embed_bin", "evaluate_bin", "five_benchmark_average",
           "expand_bin_paths", "run_verification", "format_verification"]
