"""Data: task registry, loaders (MedMNIST npz at any size, image folders, CSV manifests), preprocessing and
task-balanced sampling. Every task is loaded as uint8 HWC arrays at the model's input size."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

# Grey images are replicated into 3 identical channels; every task is normalised with mean = std = 0.5
# per channel, so the student sees one input format: float32 [3, 28, 28] in [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one MedMNIST task (what the manifest publishes)."""

    id: str
    file: str
    name: str
    modality: str
    labels: tuple[str, ...]
    channels: int
    official_md5: str | None = None
    reference_acc: float | None = None  # MedMNIST v2 ResNet-18 (28) test ACC
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    @property
    def num_classes(self) -> int:
        return len(self.labels)


TASKS: dict[str, TaskSpec] = {
    "breast": TaskSpec(
        "breast", "breastmnist.npz", "BreastMNIST: breast ultrasound", "ultrasound",
        ("malignant", "normal, benign"), 1, "750601b1f35ba3300ea97c75c52ff8f6", 0.863,
    ),
    "pneumonia": TaskSpec(
        "pneumonia", "pneumoniamnist.npz", "PneumoniaMNIST: paediatric chest X-ray", "x-ray",
        ("normal", "pneumonia"), 1, "88f817cb74189d81f6df1930098ff783", 0.854,
    ),
    "retina": TaskSpec(
        "retina", "retinamnist.npz", "RetinaMNIST: retinal fundus, diabetic retinopathy grade", "fundus photograph",
        ("0", "1", "2", "3", "4"), 3, "bd4c0672f1bba3e3a89f0e4e876791e4", 0.524,
    ),
}
DEFAULT_TASKS = ("breast", "pneumonia", "retina")


def default_data_dir() -> Path:
    """`../shared/data/medmnist` relative to the repository root (override with LORKD_DATA_DIR)."""
    env = os.environ.get("LORKD_DATA_DIR")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data" / "medmnist"


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TaskData:
    """One task's splits as uint8 HWC images (channels 1 or 3) and int64 labels."""

    spec: TaskSpec
    images: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    md5: str = ""
    # under cross-validation: each of train and val as indices into the pool (official train then val)
    pool_index: dict[str, np.ndarray] = field(default_factory=dict)


def load_npz(path: Path, spec: TaskSpec) -> TaskData:
    """Read an npz in the official MedMNIST layout (`<split>_images`, `<split>_labels` of shape (N, 1))."""
    td = TaskData(spec=spec, md5=md5sum(Path(path)))
    with np.load(path) as z:
        for split in SPLITS:
            imgs = np.asarray(z[f"{split}_images"], dtype=np.uint8)
            if imgs.ndim == 3:
                imgs = imgs[..., None]
            if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
                raise ValueError(f"{path}: {split}_images has shape {imgs.shape}, expected (N,H,W) or (N,H,W,1|3)")
            labels = np.asarray(z[f"{split}_labels"]).reshape(-1).astype(np.int64)
            if len(labels) != len(imgs):
                raise ValueError(f"{path}: {split} has {len(imgs)} images but {len(labels)} labels")
            if labels.min() < 0 or labels.max() >= spec.num_classes:
                raise ValueError(f"{path}: {split} labels outside [0, {spec.num_classes})")
            td.images[split] = imgs
            td.labels[split] = labels
    return td


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def task_spec(task_id: str, source: dict | None = None) -> TaskSpec:
    """The registry entry for a MedMNIST id, with any field overridden by the config's task source;
    an unknown id needs at least `labels` (and `channels`, default 3) unless the loader finds the labels."""
    source = source or {}
    fields = {k: source[k] for k in ("name", "modality", "labels", "channels", "mean", "std") if k in source}
    for k in ("labels", "mean", "std"):
        if k in fields:
            fields[k] = tuple(str(v) for v in fields[k]) if k == "labels" else tuple(float(v) for v in fields[k])
    if "file" in source or "path" in source:
        fields["file"] = str(source.get("path") or source.get("file"))
    base = TASKS.get(task_id)
    if base is not None:
        if "file" in fields:  # another file (e.g. MedMNIST+ 64/128/224 px): the official md5 no longer applies
            fields["official_md5"] = None
        return dataclasses.replace(base, **fields)
    return TaskSpec(id=task_id, file=fields.pop("file", ""), name=fields.pop("name", task_id),
                    modality=fields.pop("modality", "unknown"), labels=fields.pop("labels", ()),
                    channels=int(fields.pop("channels", 3)), **fields)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> (N, size, size, C), bilinear (PIL); unchanged when already that size."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, images.shape[3]), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        out[i] = np.asarray(pil.resize((size, size), Image.BILINEAR)).reshape(size, size, -1)
    return out


def read_image(path: Path, channels: int) -> np.ndarray:
    """One image file as uint8 (H, W, channels): grey for 1 (BT.601 luminance, as the service), RGB for 3."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit -> 8-bit by v >> 8 (FORMAT.md section 4)
            arr = np.asarray(im, dtype=np.uint32) >> 8
            im = Image.fromarray(arr.astype(np.uint8))
        im = im.convert("L" if channels == 1 else "RGB")
        return np.asarray(im).reshape(im.size[1], im.size[0], channels)


def _stack(paths: list[Path], channels: int, size: int | None, where: str) -> np.ndarray:
    imgs = [read_image(p, channels) for p in paths]
    if size is None:
        shapes = {i.shape for i in imgs}
        if len(shapes) > 1:
            raise ValueError(f"{where}: images of different sizes {sorted(shapes)[:3]}: set image_size")
        return np.stack(imgs) if imgs else np.zeros((0, 1, 1, channels), np.uint8)
    return np.stack([resize_images(i[None], size)[0] for i in imgs]) if imgs else np.zeros(
        (0, size, size, channels), np.uint8)


def load_folder(root: Path, spec: TaskSpec, size: int | None = None) -> TaskData:
    """Folder of images: `root/<split>/<class>/<image>` for split in train, val, test. Classes are the
    spec's labels in order, or the sorted class folder names of train/ when the spec has none."""
    root = Path(root)
    labels = spec.labels or tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if not labels:
        raise ValueError(f"{root}/train has no class folders")
    spec = dataclasses.replace(spec, labels=labels)
    td = TaskData(spec=spec, md5="folder")
    for split in SPLITS:
        paths, ys = [], []
        for c, name in enumerate(labels):
            d = root / split / name
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS) if d.is_dir() else []
            paths += files
            ys += [c] * len(files)
        found = {p.name for p in (root / split).iterdir() if p.is_dir()} if (root / split).is_dir() else set()
        extra = found - set(labels)
        if extra:
            raise ValueError(f"{root}/{split}: class folders {sorted(extra)} are not among the labels {labels}")
        td.images[split] = _stack(paths, spec.channels, size, f"{root}/{split}")
        td.labels[split] = np.asarray(ys, dtype=np.int64)
    return td


def load_csv(path: Path, spec: TaskSpec, size: int | None = None) -> TaskData:
    """CSV manifest with columns `path,label,split` (header row); paths relative to the CSV's folder;
    label = class name (from the spec's labels, or sorted names found) or class index."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label", "split"} <= set(rows[0]):
        raise ValueError(f"{path}: needs a header with columns path,label,split")
    bad = {r["split"] for r in rows} - set(SPLITS)
    if bad:
        raise ValueError(f"{path}: unknown splits {sorted(bad)} (use train, val, test)")
    labels = spec.labels
    if not labels:
        raw = sorted({r["label"] for r in rows})
        labels = tuple(str(i) for i in range(int(max(raw, key=int)) + 1)) if all(v.isdigit() for v in raw) \
            else tuple(raw)
    spec = dataclasses.replace(spec, labels=labels)
    index = {name: i for i, name in enumerate(labels)}

    def label_of(v: str) -> int:
        if v in index:
            return index[v]
        if v.isdigit() and int(v) < len(labels):
            return int(v)
        raise ValueError(f"{path}: label {v!r} is not one of {labels}")

    td = TaskData(spec=spec, md5=md5sum(path))
    for split in SPLITS:
        sel = [r for r in rows if r["split"] == split]
        td.images[split] = _stack([path.parent / r["path"] for r in sel], spec.channels, size, f"{path} {split}")
        td.labels[split] = np.asarray([label_of(r["label"]) for r in sel], dtype=np.int64)
    return td


def load_task(task_id: str, source: dict | None = None, data_dir: Path | None = None,
              image_size: int | None = None) -> TaskData:
    """One task from its config source: {"type": "npz" | "folder" | "csv", "path": ...} plus optional spec
    fields (labels, channels, mean, std, name, modality). No source = the MedMNIST npz of that id in data_dir.
    Images are resized to image_size (None = keep; npz files of any resolution are accepted)."""
    source = dict(source or {})
    kind = source.pop("type", "npz")
    spec = task_spec(task_id, source)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    # a path is absolute, relative to the working directory, or else relative to data_dir (MedMNIST file names)
    where = Path(spec.file)
    if not where.is_absolute() and not where.exists():
        where = data_dir / spec.file
    if kind == "npz":
        if not spec.labels:  # unknown id without labels: class indices
            with np.load(where) as z:
                n = int(np.asarray(z["train_labels"]).max()) + 1
            spec = dataclasses.replace(spec, labels=tuple(str(i) for i in range(n)))
        td = load_npz(where, spec)
    elif kind == "folder":
        td = load_folder(where, spec, image_size)
    elif kind == "csv":
        td = load_csv(where, spec, image_size)
    else:
        raise ValueError(f"task {task_id}: unknown source type {kind!r} (npz, folder, csv)")
    if not td.spec.labels:
        raise ValueError(f"task {task_id}: no labels")
    if image_size:
        for split in SPLITS:
            td.images[split] = resize_images(td.images[split], image_size)
    return td


def load_tasks(task_ids: list[str] | tuple[str, ...] = DEFAULT_TASKS, data_dir: Path | None = None,
               sources: dict | None = None, image_size: int | None = None) -> list[TaskData]:
    sources = sources or {}
    return [load_task(t, sources.get(t), data_dir, image_size) for t in task_ids]


def load_config_tasks(cfg, data_dir: Path | None = None) -> list[TaskData]:
    """The tasks of a TrainConfig (or its dict form): ids, sources, the model's input size, and the
    cross-validation fold when `cv_folds` is set (every consumer of a run sees the same split)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    tasks = load_tasks(list(get("tasks")), data_dir, get("task_sources") or {}, get("image_size") or None)
    folds = int(get("cv_folds") or 0)
    return [cv_split(td, folds, int(get("cv_fold") or 0)) for td in tasks] if folds else tasks


# One fold assignment for every configuration and seed, so that cross-validated runs are paired image for image.
CV_SEED = 13


def cv_folds_of(labels: np.ndarray, folds: int, seed: int = CV_SEED) -> np.ndarray:
    """The fold (0..folds-1) of every pool image, stratified: each class's images are shuffled and dealt round
    robin, the deal continuing across classes, so folds differ in size by at most one image and in each class's
    count by at most one."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {folds}")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    dealt = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (dealt + np.arange(len(idx))) % folds
        dealt += len(idx)
    return fold


def cv_split(td: TaskData, folds: int, fold: int, seed: int = CV_SEED) -> TaskData:
    """Cross-validation on train+val (issue 13: 78 Breast and 120 Retina val images cannot separate
    configurations): the pool is the official train split followed by val; fold `fold` becomes val and the other
    folds train, each in pool order. Test is untouched, so test numbers stay comparable with the official split."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} outside 0..{folds - 1}")
    images = np.concatenate([td.images["train"], td.images["val"]])
    labels = np.concatenate([td.labels["train"], td.labels["val"]])
    which = cv_folds_of(labels, folds, seed)
    out = dataclasses.replace(td, images=dict(td.images), labels=dict(td.labels), pool_index={})
    for split, keep in (("train", which != fold), ("val", which == fold)):
        idx = np.flatnonzero(keep)
        out.images[split], out.labels[split], out.pool_index[split] = images[idx], labels[idx], idx
    return out


def to_tensor(images: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    """uint8 (N, H, W, C in {1, 3}) -> float32 normalised (N, 3, H, W); grey is repeated to 3 channels."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def task_tensor(td: TaskData, split: str) -> torch.Tensor:
    """A task's split, preprocessed with the task's own normalisation (FORMAT.md section 4)."""
    return to_tensor(td.images[split], td.spec.mean, td.spec.std)


class MultiTaskDataset(Dataset):
    """The union of several tasks' split; item = (image [3,H,W], label, task index, index within dataset)."""

    def __init__(self, tasks: list[TaskData], split: str, task_index: dict[str, int] | None = None):
        task_index = task_index or {td.spec.id: i for i, td in enumerate(tasks)}
        sizes = {td.images[split].shape[1:3] for td in tasks}
        if len(sizes) > 1:
            raise ValueError(f"tasks have different image sizes {sorted(sizes)}: load them with one image_size")
        self.x = torch.cat([task_tensor(td, split) for td in tasks])
        self.y = torch.cat([torch.from_numpy(td.labels[split]) for td in tasks])
        self.t = torch.cat(
            [torch.full((len(td.labels[split]),), task_index[td.spec.id], dtype=torch.long) for td in tasks]
        )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], self.t[i], i


def task_balanced_weights(task_of_sample: torch.Tensor, power: float) -> torch.Tensor:
    """Per-sample sampling weights such that task t's share of draws is proportional to n_t ** power.

    power = 1 reproduces plain uniform sampling; power = 0 gives every task an equal share.
    """
    counts = torch.bincount(task_of_sample).double()
    per_task = counts.pow(power) / counts
    return per_task[task_of_sample]


def class_weights(labels: np.ndarray, num_classes: int, power: float) -> torch.Tensor:
    """CE class weights (n / (C * n_c)) ** power, so power = 1 is inverse frequency and 0 is unweighted."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    w = (counts.sum() / (num_classes * counts)) ** power
    return torch.tensor(w, dtype=torch.float32)
