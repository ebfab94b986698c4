"""Few-shot linear classification on frozen features (SILC Table 1): big_vision's closed-form
regularised least squares.

Protocol (google-research/big_vision evaluators/fewshot_lsr.py and configs/common_fewshot.py, read
for facts): features are the image tower's pre-logits; for each seed s in 0..num_seeds-1 a
`np.random.default_rng(s)` permutes each class's training indices in class order and the first k
of each are the k-shot training set (so the 1-shot set is inside the 5-shot set); features are
whitened with that set's mean and std (+1e-5), a constant feature 100.0 is appended (a nearly
unregularised bias), targets are one-hot in {-1, +1}, and W = (X^T X + l2 I)^-1 X^T Y (or the dual
form when there are fewer points than dimensions) with the fixed l2 = 1024; accuracy of argmax on
the test set. Each seed is reported, and their mean.

The shard unit is one example of train pool + test set (features are per-example outputs; the
solve runs once, in `finalize`, on every feature in index order).
"""
from __future__ import annotations

import numpy as np
import torch

from silc_bench.data.classification import open_split
from silc_bench.data.transforms import ImageTransform
from silc_bench.harness.base import EXAMPLES, INDEX, Harness
from silc_bench.harness.image_level import dataset_entry, image_embeddings

BIAS_CONSTANT = 100.0


def lsr_accuracy(x_train, y_train, x_test, y_test, num_classes: int, l2_reg: float) -> float:
    """big_vision's closed-form least squares (float64 here), accuracy in [0, 1]."""
    x = np.asarray(x_train, np.float64)
    mean, std = x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True) + 1e-5
    x = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    y = 2.0 * np.eye(num_classes)[np.asarray(y_train)] - 1.0
    n, d = x.shape
    if n >= d:
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ y), q
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ y, x.T @ q
    w = (lhs * (1.0 / (eigs + l2_reg))[None, :]) @ rhs
    xt = np.pad((np.asarray(x_test, np.float64) - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    return float(np.mean(np.argmax(xt @ w, axis=1) == np.asarray(y_test)))


def shot_indices(labels_train: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """Per class, its train indices in big_vision's seeded order (take the first k for k shots)."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.where(labels_train == c)[0]) for c in range(num_classes)]


class TrainPlusTest(torch.utils.data.Dataset):
    """The train pool (indices 0..n_train-1), then the test split: one index space to shard."""

    def __init__(self, train, test):
        self.train, self.test = train, test
        self.name, self.classnames = test.name, test.classnames
        self.num_classes = len(test.classnames)
        self.root = getattr(test, "root", None)
        self.select_pool(None)

    def select_pool(self, train_per_class: int | None) -> None:
        """Train pool: all of the train split, or its first `train_per_class` images of each class
        (file order; e.g. ImageNet, whose full train split is more than few-shot needs)."""
        keep = list(range(len(self.train)))
        if train_per_class:
            seen: dict[int, int] = {}
            keep = []
            for i, label in enumerate(self.train.labels):
                if seen.get(label, 0) < train_per_class:
                    seen[label] = seen.get(label, 0) + 1
                    keep.append(i)
        self.train_keep, self.n_train, self.train_per_class = keep, len(keep), train_per_class
        self.labels = [self.train.labels[i] for i in keep] + list(self.test.labels)

    def describe(self) -> dict:
        return {"num_train_pool": self.n_train, "num_test": len(self.test), "train_per_class": self.train_per_class}

    def __len__(self):
        return self.n_train + len(self.test)

    def __getitem__(self, index: int) -> dict:
        item = self.train[self.train_keep[index]] if index < self.n_train else self.test[index - self.n_train]
        return {**item, "index": index}


class FewShotLinear(Harness):
    def open_dataset(self, name, data_root, limit=None):
        entry = dataset_entry(name, ("classification",))
        train = open_split(entry, "train", data_root)
        test = open_split(entry, "test", data_root, limit)
        return TrainPlusTest(train, test)

    def setup(self, model, dataset, protocol, device, cache=None):
        dataset.select_pool(protocol.get("train_per_class"))
        representation = protocol["representation"]
        encode = model.encode_image
        used = "embedding"
        if representation == "pre_logits":
            try:
                with torch.inference_mode():
                    model.encode_image_pre_logits(torch.zeros(1, 3, *model.preprocess.image_size, device=device))
                encode, used = model.encode_image_pre_logits, "pre_logits"
            except NotImplementedError:
                used = "embedding (this model format exposes no pre-logits)"
        details = {"representation": used, "image_transform": ImageTransform(model.preprocess).describe(),
                   "num_train_pool": dataset.n_train, "num_test": len(dataset.test)}
        return _Prepared(encode, details, protocol)

    def evaluate(self, model, dataset, prepared, indices, *, device, batch_size=16, workers=0, progress=None):
        indices = list(indices)
        feats = image_embeddings(model, dataset, indices, device=device, batch_size=batch_size, workers=workers,
                                 progress=progress, encode=prepared.encode) if indices else torch.zeros(0, 0)
        return {EXAMPLES: {INDEX: torch.tensor(indices, dtype=torch.long), "feature": feats,
                           "label": torch.tensor([dataset.labels[i] for i in indices], dtype=torch.long)}}

    def finalize(self, dataset, merged, prepared):
        p = prepared.protocol
        ex = merged[EXAMPLES]
        if len(ex[INDEX]) != len(dataset) or not torch.equal(ex[INDEX], torch.arange(len(dataset))):
            raise RuntimeError("few-shot needs the feature of every example")
        feats, labels = ex["feature"].numpy(), ex["label"].numpy()
        n = dataset.n_train
        x_tr, y_tr, x_te, y_te = feats[:n], labels[:n], feats[n:], labels[n:]
        metrics = {}
        for shots in p["shots"]:
            accs = []
            for seed in range(int(p["num_seeds"])):
                order = shot_indices(y_tr, dataset.num_classes, seed)
                take = np.concatenate([o[:shots] for o in order])
                acc = 100.0 * lsr_accuracy(x_tr[take], y_tr[take], x_te, y_te, dataset.num_classes, float(p["l2_reg"]))
                metrics[f"top1_{shots}shot_seed{seed}"] = acc
                accs.append(acc)
            metrics[f"top1_{shots}shot"] = float(np.mean(accs))
        return metrics, {}


class _Prepared:
    def __init__(self, encode, details, protocol):
        self.encode, self.details, self.protocol = encode, details, protocol
